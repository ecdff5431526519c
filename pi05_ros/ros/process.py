"""Start-up shared by the package's executables: signals that only set a flag, then rclpy without its own
signal handlers, so each executable shuts down in its own order (and within a second)."""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

import rclpy
from rclpy.signals import SignalHandlerOptions

from pi05_ros.signals import StopEvent, stop_on_signals

DDS_PROFILE_FILE = "fastdds_profile.xml"  # in the package's share/pi05_ros/config/
_PROFILE_VARIABLES = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE",
                      "RMW_FASTRTPS_USE_QOS_FROM_XML")


def use_dds_profile(environ: MutableMapping[str, str] = os.environ, profile: Path | None = None) -> Path | None:
    """Point Fast DDS at the package's profile (config/fastdds_profile.xml: readers free each sample's buffer, so
    a burst of huge frames does not stay in the node's memory) before rclpy creates the participant. Nothing is
    changed when another RMW is chosen or the user set a profile (or RMW_FASTRTPS_USE_QOS_FROM_XML) already.
    Returns the profile used, or None."""
    if environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") != "rmw_fastrtps_cpp":
        return None
    if any(name in environ for name in _PROFILE_VARIABLES):
        return None
    if profile is None:
        try:
            from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        except ImportError:
            return None
        try:
            profile = Path(get_package_share_directory("pi05_ros")) / "config" / DDS_PROFILE_FILE
        except PackageNotFoundError:
            return None
    if not profile.is_file():
        return None
    environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(profile)
    environ["RMW_FASTRTPS_USE_QOS_FROM_XML"] = "1"
    return profile


def init_ros(argv: list[str] | None, dds_profile: bool = False) -> StopEvent:
    """Install SIGINT/SIGTERM handlers and initialise rclpy; the returned event is set on either signal.
    `dds_profile`: first apply the package's Fast DDS profile (use_dds_profile)."""
    if dds_profile:
        use_dds_profile()
    stop = stop_on_signals()
    rclpy.init(args=sys.argv if argv is None else argv, signal_handler_options=SignalHandlerOptions.NO)
    return stop
