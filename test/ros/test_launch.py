"""launch/policy.launch.py, checked without `launch`/`launch_ros` (not installable here, see ROS2_WHEELS.md).

The file is read with `ast` for what it declares, then executed once against small stand-ins of the launch
classes it uses (only to record what it would hand to ros2 launch). The stand-ins are not mocks of our code:
they replace a library this machine cannot have.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from ros_harness import package_prefix

from pi05_ros.ros.params import PARAMETERS

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_FILE = ROOT / "launch" / "policy.launch.py"
EXPECTED_ARGUMENTS = {"checkpoint", "tokenizer", "params_file", "denoise_steps", "precision", "namespace", "demo",
                      "autostart", "policy_backend", "policy_server_url"}
# Names these modules export in ROS 2 Jazzy; anything else imported would fail on a robot.
JAZZY_API = {
    "launch": {"LaunchDescription", "LaunchContext"},
    "launch.actions": {"DeclareLaunchArgument", "OpaqueFunction", "GroupAction", "IncludeLaunchDescription",
                       "EmitEvent", "LogInfo", "RegisterEventHandler"},
    "launch.events": {"matches_action"},
    "launch.substitutions": {"LaunchConfiguration", "PathJoinSubstitution", "TextSubstitution"},
    "launch.conditions": {"IfCondition", "UnlessCondition"},
    "launch_ros.actions": {"Node", "PushRosNamespace", "LifecycleNode"},
    "launch_ros.event_handlers": {"OnStateTransition"},
    "launch_ros.events.lifecycle": {"ChangeState"},
    "launch_ros.substitutions": {"FindPackageShare"},
    "lifecycle_msgs.msg": {"Transition"},  # installable here: the stand-ins below leave it real
}


def test_launch_file_is_installed() -> None:
    installed = package_prefix() / "share" / "pi05_ros" / "launch" / "policy.launch.py"
    assert installed.read_text() == LAUNCH_FILE.read_text()


def test_declares_exactly_the_documented_arguments_via_ast() -> None:
    tree = ast.parse(LAUNCH_FILE.read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    arguments = next(
        node.value for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "ARGUMENTS"
    )
    assert isinstance(arguments, ast.Dict)
    assert {ast.literal_eval(key) for key in arguments.keys} == EXPECTED_ARGUMENTS


def test_imports_only_real_jazzy_launch_api() -> None:
    tree = ast.parse(LAUNCH_FILE.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module in JAZZY_API, f"imports from {node.module}"
            for alias in node.names:
                assert alias.name in JAZZY_API[node.module], f"{node.module}.{alias.name} is not Jazzy launch API"
        assert not isinstance(node, ast.Import), "plain imports are not expected in the launch file"


# --- stand-ins for the launch library, recording their arguments


class _Recorded:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration(_Recorded):
    def perform(self, context: Any) -> str:
        return context.launch_configurations[self.args[0]]


def _matches_action(action: Any) -> tuple[str, Any]:
    return ("matches", action)


def _stub_launch_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    classes = {
        "launch": {"LaunchDescription": _Recorded, "LaunchContext": _Recorded},
        "launch.actions": {"DeclareLaunchArgument": _Recorded, "OpaqueFunction": _Recorded, "EmitEvent": _Recorded,
                           "LogInfo": _Recorded, "RegisterEventHandler": _Recorded},
        "launch.events": {},
        "launch.substitutions": {"LaunchConfiguration": _LaunchConfiguration, "PathJoinSubstitution": _Recorded},
        "launch_ros": {},
        "launch_ros.actions": {"Node": _Recorded, "LifecycleNode": _Recorded},
        "launch_ros.event_handlers": {"OnStateTransition": _Recorded},
        "launch_ros.events": {},
        "launch_ros.events.lifecycle": {"ChangeState": _Recorded},
        "launch_ros.substitutions": {"FindPackageShare": _Recorded},
    }
    for name, members in classes.items():
        module = types.ModuleType(name)
        for attribute, value in members.items():
            setattr(module, attribute, type(attribute, (value,), {}))
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["launch.events"].matches_action = _matches_action


@pytest.fixture
def launch_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    _stub_launch_modules(monkeypatch)
    spec = importlib.util.spec_from_file_location("policy_launch_under_test", LAUNCH_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nodes(module: types.ModuleType, **configuration: str) -> list[Any]:
    defaults = {"checkpoint": "", "tokenizer": "", "params_file": "/cfg/pi05.yaml", "denoise_steps": "",
                "precision": "", "namespace": "", "demo": "", "autostart": "true", "policy_backend": "",
                "policy_server_url": ""}
    context = types.SimpleNamespace(launch_configurations={**defaults, **configuration})
    description = module.generate_launch_description()
    opaque = description.args[0][-1]
    return opaque.kwargs["function"](context)


def test_description_declares_arguments_with_descriptions(launch_module: types.ModuleType) -> None:
    entities = launch_module.generate_launch_description().args[0]
    declared = {e.args[0]: e.kwargs for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    assert set(declared) == EXPECTED_ARGUMENTS
    for name, kwargs in declared.items():
        assert len(kwargs["description"]) > 10, name
    assert declared["demo"]["default_value"] == ""  # empty: the params file decides
    share = declared["params_file"]["default_value"]  # PathJoinSubstitution([FindPackageShare, config, file])
    assert share.args[0][0].args == ("pi05_ros",) and share.args[0][1:] == ["config", "pi05.yaml"]


def _of(entities: list[Any], kind: str) -> list[Any]:
    return [e for e in entities if type(e).__name__ == kind]


def test_defaults_start_the_managed_node_and_drive_configure_then_activate(launch_module) -> None:
    entities = _nodes(launch_module)
    (node,) = _of(entities, "LifecycleNode")
    assert node.kwargs["package"] == "pi05_ros" and node.kwargs["executable"] == "policy_node"
    assert node.kwargs["name"] == "pi05_policy" and node.kwargs["namespace"] == ""  # LifecycleNode needs both
    # The node's own autostart is off: launch drives it (two drivers would send configure twice).
    assert node.kwargs["parameters"] == ["/cfg/pi05.yaml", {"autostart": False}]
    from lifecycle_msgs.msg import Transition

    (configure,) = _of(entities, "EmitEvent")
    event = configure.kwargs["event"]
    assert event.kwargs["transition_id"] == Transition.TRANSITION_CONFIGURE
    assert event.kwargs["lifecycle_node_matcher"] == ("matches", node)
    handlers = [h.args[0] for h in _of(entities, "RegisterEventHandler")]
    on_inactive = next(h for h in handlers if h.kwargs.get("goal_state") == "inactive")
    assert on_inactive.kwargs["start_state"] == "configuring" and on_inactive.kwargs["target_lifecycle_node"] is node
    (activate,) = _of(on_inactive.kwargs["entities"], "EmitEvent")
    assert activate.kwargs["event"].kwargs["transition_id"] == Transition.TRANSITION_ACTIVATE
    # handlers are registered before the node starts, so no transition event is missed
    assert entities.index(handlers and _of(entities, "RegisterEventHandler")[0]) < entities.index(node)
    assert entities.index(node) < entities.index(configure)


def test_autostart_false_leaves_the_node_to_a_lifecycle_manager(launch_module) -> None:
    entities = _nodes(launch_module, autostart="false")
    assert [type(e).__name__ for e in entities] == ["LifecycleNode"]
    assert entities[0].kwargs["parameters"][1] == {"autostart": False}


def test_arguments_become_typed_parameter_overrides(launch_module) -> None:
    entities = _nodes(launch_module, checkpoint="/ckpt", tokenizer="/tok.model", denoise_steps="5",
                      precision="bf16", namespace="arm", demo="true")
    (policy,) = _of(entities, "LifecycleNode")
    (sources,) = _of(entities, "Node")
    params_file, overrides = policy.kwargs["parameters"]
    assert overrides == {"checkpoint": "/ckpt", "tokenizer": "/tok.model", "precision": "bf16",
                         "denoise_steps": 5, "demo": True, "autostart": False}
    declared = {spec.name for spec in PARAMETERS}
    assert set(overrides) <= declared
    assert sources.kwargs["executable"] == "demo_sources" and sources.kwargs["namespace"] == "arm"
    assert policy.kwargs["namespace"] == "arm"
    # demo:=false overrides a params file that says demo: true (and starts no demo_sources)
    (policy,) = _of(_nodes(launch_module, demo="false"), "LifecycleNode")
    assert policy.kwargs["parameters"][1] == {"demo": False, "autostart": False}
    with pytest.raises(ValueError, match="launch argument denoise_steps must be an integer in 1..100, got '5.0'"):
        _nodes(launch_module, denoise_steps="5.0")
    remote = _nodes(launch_module, policy_backend="remote", policy_server_url="ws://gpu-host:8000/pi05_ros")
    (policy,) = _of(remote, "LifecycleNode")
    assert policy.kwargs["parameters"][1] == {"policy_backend": "remote",
                                              "policy_server_url": "ws://gpu-host:8000/pi05_ros", "autostart": False}


def test_executables_named_by_the_launch_file_are_installed() -> None:
    cmake = (ROOT / "CMakeLists.txt").read_text()
    programs = re.search(r"install\(PROGRAMS(.*?)DESTINATION lib/\$\{PROJECT_NAME\}", cmake, re.S)
    assert programs is not None
    for executable in ("policy_node", "demo_sources", "policy_monitor"):
        assert f"scripts/{executable}" in programs.group(1)
        assert (package_prefix() / "lib" / "pi05_ros" / executable).stat().st_mode & 0o111
