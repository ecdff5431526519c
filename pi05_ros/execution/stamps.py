"""Which header stamps the node trusts for timing, and what it uses when it cannot.

Rule (docs/ros_node.md, "Stamps"), for the stamp of every camera frame and joint state, judged against the
ROS clock when the message arrives:
- zero: the publisher does not stamp; the arrival time is used instead (latency compensation then misses the
  transport and driver delay) and a WARN names the topic;
- later than the arrival by more than `future_tolerance_s`: the publisher's clock is ahead (not synchronized,
  or sim time against system time); the arrival time is used instead, WARN;
  a stamp up to the tolerance in the future is clamped to the arrival time (it cannot be newer than that);
- earlier than the arrival by more than `max_input_age_s` (far in the past, near the epoch): the message is
  stale on arrival and is not used, WARN (no inference, commands hold or stop as for any stale input).
No ROS imports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StampIssue(enum.StrEnum):
    ZERO = "zero"
    FUTURE = "future"
    PAST = "past"


@dataclass(frozen=True)
class StampVerdict:
    stamp_ns: int  # the time to use for this message (its own stamp, or the arrival time)
    issue: StampIssue | None  # why the message's own stamp was not used as is; None when it was
    usable: bool  # False: the message is too old to use at all
    offset_ns: int  # message stamp - arrival time (negative: in the past)

    def describe(self, topic: str) -> str:
        """A message for the user naming the cause and the fix; '' when the stamp was fine."""
        offset_s = self.offset_ns / 1e9
        if self.issue is StampIssue.ZERO:
            return (f"'{topic}' has header.stamp 0; using its arrival time instead (transport delay is not "
                    "compensated). Make its publisher stamp messages with the capture time")
        if self.issue is StampIssue.FUTURE:
            return (f"'{topic}' is stamped {offset_s:.3f} s in the future; using its arrival time instead. "
                    "Synchronize the publisher's clock with this node's (chrony/PTP), and check use_sim_time")
        if self.issue is StampIssue.PAST:
            return (f"'{topic}' is stamped {-offset_s:.3f} s before it arrived, older than max_input_age_s: "
                    "not used. Synchronize the clocks (chrony/PTP) or check use_sim_time on both sides")
        return ""


def judge_stamp(stamp_ns: int, arrival_ns: int, *, future_tolerance_ns: int, max_age_ns: int) -> StampVerdict:
    """The stamp to use for a message stamped `stamp_ns` that arrived at `arrival_ns` (both ROS clock)."""
    offset = stamp_ns - arrival_ns
    if stamp_ns == 0:
        return StampVerdict(arrival_ns, StampIssue.ZERO, True, offset)
    if offset > future_tolerance_ns:
        return StampVerdict(arrival_ns, StampIssue.FUTURE, True, offset)
    if -offset > max_age_ns:
        return StampVerdict(stamp_ns, StampIssue.PAST, False, offset)
    return StampVerdict(min(stamp_ns, arrival_ns), None, True, offset)
