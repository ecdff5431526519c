"""The execution layer: what reaches the robot, computed without ROS (no rclpy, no message types, no torch).

- `stamps`: which observation stamps can be trusted for timing, and what is used instead.
- `plan`: a chunk in command terms: action k due at t_obs + (k + 1) * action_dt, positions and velocities per
  command joint (velocity columns integrated from the observed state, position columns differentiated).
- `limits`: per-joint position / velocity / acceleration limits and the clipping of commands against them;
  `urdf`: the limits of a robot_description.
- `blend`: the hand-over strategies (replace, crossfade, weighted_average, temporal_ensemble);
  `queue`: the streaming queue of upcoming commands on the control grid, merging each chunk at its offset.
- `commander`: chunk mode (bounded, stamped trajectories) and stream mode (one command per control tick),
  holds and stops when inputs go stale; `loop`: the control-loop thread and its jitter.

The node (pi05_ros/ros/node.py) feeds these with chunks, the clock and the input state, and turns what they
return into messages (pi05_ros/ros/conversions.py). Times are integer nanoseconds of the ROS clock.
"""
