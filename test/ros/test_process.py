"""The Fast DDS profile the node starts with: applied unless the user chose a profile or another RMW."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from ros_harness import package_prefix

from pi05_ros.ros.process import DDS_PROFILE_FILE, use_dds_profile

NS = "{http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles}"


def test_the_installed_profile_is_applied_when_nothing_else_is_chosen(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    profile = use_dds_profile(environ)
    assert profile == package_prefix() / "share" / "pi05_ros" / "config" / DDS_PROFILE_FILE
    assert environ == {"FASTRTPS_DEFAULT_PROFILES_FILE": str(profile), "RMW_FASTRTPS_USE_QOS_FROM_XML": "1"}
    # readers free each sample's buffer; the rest as rmw_fastrtps sets it by default
    root = ET.parse(profile).getroot()
    reader = root.find(f"{NS}data_reader")
    writer = root.find(f"{NS}data_writer")
    assert reader.get("is_default_profile") == "true" and reader.find(f"{NS}historyMemoryPolicy").text == "DYNAMIC"
    assert writer.find(f"{NS}qos/{NS}publishMode/{NS}kind").text == "SYNCHRONOUS"
    source = Path(__file__).resolve().parents[2] / "config" / DDS_PROFILE_FILE
    assert source.read_text() == profile.read_text()


def test_a_users_choice_is_left_alone(tmp_path: Path) -> None:
    for environ in ({"FASTRTPS_DEFAULT_PROFILES_FILE": "/mine.xml"}, {"FASTDDS_DEFAULT_PROFILES_FILE": "/mine.xml"},
                    {"RMW_FASTRTPS_USE_QOS_FROM_XML": "0"}, {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}):
        before = dict(environ)
        assert use_dds_profile(environ) is None and environ == before
    assert use_dds_profile({}, profile=tmp_path / "missing.xml") is None
