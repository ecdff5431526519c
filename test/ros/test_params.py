"""Parameters: declared once with descriptors, config/pi05.yaml in step with them, run-time validation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import rclpy
import yaml
from rclpy.context import Context
from rclpy.node import Node
from rclpy.parameter import Parameter
from ros_harness import installed_params_file

from pi05_ros.ros.params import (
    DYNAMIC_PARAMETERS,
    MAX_DENOISE_STEPS,
    PARAMETERS,
    ConfigError,
    RuntimeSettings,
    camera_parameters,
    declare_joint_limits,
    declare_parameters,
    ignored_by_remote_backend,
    unused_joint_limit_overrides,
    unused_overrides,
    updated_runtime,
    validate_runtime_value,
)

SOURCE_CONFIG = Path(__file__).resolve().parents[2] / "config" / "pi05.yaml"


@pytest.fixture
def make_node() -> Iterator:
    contexts: list[tuple[Context, Node]] = []

    def make(*ros_args: str, namespace: str = "") -> Node:
        context = Context()
        rclpy.init(context=context, args=["test", "--ros-args", *ros_args])
        node = Node("pi05_policy", namespace=namespace, context=context)
        contexts.append((context, node))
        return node

    yield make
    for context, node in contexts:
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def yaml_parameters(path: Path) -> dict:
    document = yaml.safe_load(path.read_text())
    (section,) = document.values()
    return section["ros__parameters"]


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_config_file_sets_exactly_the_declared_parameters_with_their_defaults() -> None:
    values = flatten(yaml_parameters(SOURCE_CONFIG))
    camera_specs = [spec for camera in ("base_image", "wrist_image") for spec in camera_parameters(camera)]
    declared = {spec.name: spec.default for spec in (*PARAMETERS, *camera_specs)}
    # The two list parameters whose default is empty are documented but commented out: `[]` is not valid
    # ROS parameter YAML (no element type).
    commented_out = {"state_joint_names", "action_joint_names", "command_joint_names", "action_space_mask"}
    assert set(values) == set(declared) - commented_out
    for name, value in values.items():
        assert value == declared[name], f"config/pi05.yaml: {name}={value!r}, code default {declared[name]!r}"
    text = SOURCE_CONFIG.read_text()
    for name in commented_out:
        assert f"# {name}:" in text


def test_installed_config_is_the_source_one() -> None:
    assert installed_params_file().read_text() == SOURCE_CONFIG.read_text()


def test_every_parameter_has_a_description_and_dynamic_ones_are_the_documented_ones() -> None:
    assert DYNAMIC_PARAMETERS == {"denoise_steps", "rate_hz", "default_instruction", "publish_joint_trajectory",
                                  "blend", "crossfade_actions", "weighted_average_new_weight",
                                  "temporal_ensemble_decay", "rtc_beta", "rtc_overlap", "rtc_schedule"}
    for spec in PARAMETERS:
        assert len(spec.description) > 20, spec.name


def test_declared_descriptors_carry_ranges_and_read_only(make_node) -> None:
    node = make_node()
    declare_parameters(node)
    steps = node.describe_parameter("denoise_steps")
    assert (steps.integer_range[0].from_value, steps.integer_range[0].to_value) == (1, MAX_DENOISE_STEPS)
    assert not steps.read_only
    rate = node.describe_parameter("rate_hz")
    assert rate.floating_point_range[0].from_value == pytest.approx(0.1)
    assert node.describe_parameter("checkpoint").read_only
    assert "random-weight" in node.describe_parameter("checkpoint").description
    assert node.describe_parameter("camera.base_image.slot").read_only


def test_params_file_and_overrides_reach_the_config(make_node) -> None:
    node = make_node(
        "--params-file", str(SOURCE_CONFIG),
        "-p", "denoise_steps:=4", "-p", "cameras:=[base_image, side_cam]",
        "-p", "camera.side_cam.slot:=right_wrist_0_rgb", "-p", "camera.side_cam.transport:=compressed",
        "-p", "state_joint_names:=[j1, j2]", "-p", "trigger_camera:=side_cam",
    )
    config = declare_parameters(node)
    assert config.runtime.denoise_steps == 4
    assert config.use_demo_model  # no checkpoint in the shipped config
    assert [(c.name, c.slot, c.transport, c.topic) for c in config.cameras] == [
        ("base_image", "base_0_rgb", "raw", "base_image"),
        ("side_cam", "right_wrist_0_rgb", "compressed", "side_cam/compressed"),
    ]
    assert config.state_joint_names == ("j1", "j2") and config.action_joint_names == ()
    assert config.trigger_camera == "side_cam"


@pytest.mark.parametrize("namespace", ["", "/robot_1", "/fleet/robot_2"])
def test_config_key_matches_the_node_in_any_namespace(make_node, tmp_path: Path, namespace: str) -> None:
    # The shipped file's key with a value that differs from the default, to see it arrive.
    key = next(iter(yaml.safe_load(SOURCE_CONFIG.read_text())))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({key: {"ros__parameters": {"denoise_steps": 7}}}))
    node = make_node("--params-file", str(params), namespace=namespace)
    assert declare_parameters(node).runtime.denoise_steps == 7


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-p", "cameras:=[cam_x]"], r"camera 'cam_x' has no model slot; set camera.cam_x.slot"),
        (["-p", "camera.base_image.transport:=h264"], r"camera.base_image.transport is 'h264'; use one of raw"),
        (["-p", "camera.wrist_image.slot:=base_0_rgb"], "two cameras feed the same model slot"),
        (["-p", "trigger_camera:=nope"], "trigger_camera 'nope' is not one of cameras"),
        (["-p", "cameras:=[base_image, base_image]"], "names a camera twice"),
        (["-p", "state_joint_names:=[j1, j2, j1]"], r"`state_joint_names` names joint\(s\) \['j1'\] more than once"),
        (["-p", "action_joint_names:=[a, a]"], r"`action_joint_names` names joint\(s\) \['a'\] more than once"),
        (["-p", "execution:=batch"], "execution is 'batch'; use one of chunk, stream"),
        (["-p", "command_interface:=position"], "for forward_command_controller use execution:=stream"),
        (["-p", "execution:=stream", "-p", "command_interface:=velocity", "-p", "on_stale:=stop"],
         "keeps the last velocity forever"),
        (["-p", "blend:=average"], "blend is 'average'; use one of replace, crossfade"),
    ],
)
def test_bad_startup_parameters_raise_config_error(make_node, args: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        declare_parameters(make_node(*args))


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("denoise_steps", 0, r"out of range; use an integer in 1\.\.100"),
        ("denoise_steps", 101, "out of range"),
        ("denoise_steps", 2.5, "must be of type int"),
        ("denoise_steps", True, "must be of type int"),
        ("rate_hz", 0.0, r"out of range; use a value in \[0.1, 200.0\]"),
        ("rate_hz", "fast", "must be of type float"),
        ("publish_joint_trajectory", 1, "must be of type bool"),
        ("checkpoint", "/x", "cannot change at run time"),
        ("blend", "average", "not one of replace, crossfade, weighted_average, temporal_ensemble, rtc"),
        ("rtc_beta", -1.0, r"out of range; use a value in \[0.0, 100.0\]"),
        ("rtc_schedule", "cosine", "not one of exp, linear, ones, zeros"),
        ("weighted_average_new_weight", 1.5, r"out of range; use a value in \[0.0, 1.0\]"),
        ("crossfade_actions", -1, "out of range"),
        ("execution", "stream", "cannot change at run time"),
    ],
)
def test_invalid_runtime_values_have_reasons(name: str, value: object, expected: str) -> None:
    reason = validate_runtime_value(name, value)
    assert reason is not None and re.search(expected, reason), reason


@pytest.mark.parametrize(
    ("name", "value"),
    [("denoise_steps", 1), ("denoise_steps", 100), ("rate_hz", 5), ("rate_hz", 0.1), ("default_instruction", ""),
     ("publish_joint_trajectory", False), ("blend", "temporal_ensemble"), ("temporal_ensemble_decay", -0.5),
     ("weighted_average_new_weight", 1)],
)
def test_valid_runtime_values_pass(name: str, value: object) -> None:
    assert validate_runtime_value(name, value) is None


def test_updated_runtime_applies_only_dynamic_parameters() -> None:
    current = RuntimeSettings(10, 10.0, "", True)
    new = updated_runtime(current, [Parameter("denoise_steps", value=3), Parameter("checkpoint", value="/x"),
                                    Parameter("rate_hz", value=4.0)])
    assert new == RuntimeSettings(3, 4.0, "", True)
    blended = updated_runtime(new, [Parameter("blend", value="crossfade"), Parameter("crossfade_actions", value=8)])
    assert (blended.blend, blended.crossfade_actions, blended.denoise_steps) == ("crossfade", 8, 3)
    assert current.denoise_steps == 10  # frozen: the worker's copy never changes under it


def test_execution_parameters_and_per_joint_limits(make_node) -> None:
    node = make_node("-p", "execution:=stream", "-p", "command_interface:=velocity",
                     "-p", "command_joint_names:=[j1, j2]", "-p", "joint_limits.j1.max_velocity:=1.5",
                     "-p", "joint_limits.j2.min_position:=-0.5")
    config = declare_parameters(node)
    ex = config.execution
    assert (ex.execution, ex.command_interface, ex.command_joint_names, ex.on_stale) == (
        "stream", "velocity", ("j1", "j2"), "hold")
    assert ex.autostart and not ex.allow_demo_commands
    assert declare_joint_limits(node, ["j1", "j2", "j3"]) == {"j1": {"max_velocity": 1.5},
                                                             "j2": {"min_position": -0.5}}
    assert declare_joint_limits(node, ["j1"]) == {"j1": {"max_velocity": 1.5}}  # a second configure reuses them
    assert node.describe_parameter("joint_limits.j3.max_acceleration").read_only
    assert "hold" in node.describe_parameter("on_stale").additional_constraints


def test_max_denoise_steps_matches_the_engine() -> None:
    from pi05_ros.engine.policy import MAX_DENOISE_STEPS as ENGINE_MAX

    assert MAX_DENOISE_STEPS == ENGINE_MAX


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # `[]` carries no type: rclpy kept the defaults silently (issue 11 item 4); it means an empty list.
        (["-p", "cameras:=[]"], r"parameter `cameras` is empty; list at least one camera"),
        (["-p", "rate_hz:=5"], r"parameter rate_hz is set to 5 \(an integer\) at startup .* it is a double; write "
                               r"it with a decimal point \(e.g. 5.0, not 5\)"),
        (["-p", "denoise_steps:=2.5"], r"denoise_steps is set to 2.5 \(a double\).*it is an integer"),
        (["-p", "cameras:=base_image"], r"cameras is set to 'base_image' \(a string\).*list of strings; write a list"),
        (["-p", "autostart:=1"], r"autostart is set to 1 \(an integer\).*write true or false"),
        (["-p", "denoise_steps:=500"], r"denoise_steps is set to 500 at startup, which it cannot take: Parameter "
                                       r"denoise_steps out of range. Min: 1, Max: 100"),
        (["-p", "camera.base_image.max_width:=8"], r"camera.base_image.max_width is set to 8 .* out of range"),
        (["-p", "max_abs_joint_position:=0.0"], r"max_abs_joint_position is set to 0.0 .* out of range"),
    ],
)
def test_startup_overrides_that_cannot_apply_are_errors_naming_them(make_node, args: list[str],
                                                                    expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        declare_parameters(make_node(*args))


def test_empty_list_overrides_of_empty_defaults_mean_unset(make_node) -> None:
    config = declare_parameters(make_node("-p", "state_joint_names:=[]", "-p", "command_joint_names:=[]"))
    assert config.state_joint_names == () and config.execution.command_joint_names == ()


def test_unused_overrides_are_listed_and_joint_limits_judged_at_configure(make_node) -> None:
    node = make_node("--params-file", str(SOURCE_CONFIG), "-p", "rat_hz:=5.0", "-p", "cameras:=[front]",
                     "-p", "camera.front.slot:=base_0_rgb", "-p", "joint_limits.j9.max_velocity:=1.0",
                     "-p", "joint_limits.j1.max_velocity:=2.0")
    config = declare_parameters(node)
    assert [c.name for c in config.cameras] == ["front"] and config.cameras[0].max_width == 2048
    # the shipped file's camera.base_image.* / wrist_image.* name cameras this node does not have
    assert unused_overrides(node) == [f"camera.{camera}.{name}" for camera in ("base_image", "wrist_image")
                                      for name in ("max_height", "max_width", "slot", "transport")] + ["rat_hz"]
    declare_joint_limits(node, ["j1"])
    assert unused_joint_limit_overrides(node) == ["joint_limits.j9.max_velocity"]


def test_frame_bounds_and_joint_bound_reach_the_config(make_node) -> None:
    config = declare_parameters(make_node("-p", "camera.wrist_image.max_width:=4000",
                                          "-p", "camera.wrist_image.max_height:=3000",
                                          "-p", "max_abs_joint_position:=50.0"))
    assert [(c.max_width, c.max_height) for c in config.cameras] == [(2048, 2048), (4000, 3000)]
    assert config.max_abs_joint_position == 50.0


def test_prepare_views_auto_resizes_on_arrival_only_on_a_gpu(make_node) -> None:
    auto = declare_parameters(make_node())
    assert auto.prepare_views == "auto"
    assert auto.views_on_arrival("cuda:0") and not auto.views_on_arrival("cpu")
    on_arrival = declare_parameters(make_node("-p", "prepare_views:=on_arrival"))
    assert on_arrival.views_on_arrival("cpu") and on_arrival.views_on_arrival("cuda")
    in_inference = declare_parameters(make_node("-p", "prepare_views:=in_inference"))
    assert not in_inference.views_on_arrival("cuda")
    with pytest.raises(ConfigError, match="prepare_views is 'sometimes'; use one of auto, on_arrival, in_inference"):
        declare_parameters(make_node("-p", "prepare_views:=sometimes"))


def test_local_model_parameters_set_with_a_remote_backend_are_named(make_node) -> None:
    # the shipped params file holds the defaults: with it alone nothing is reported
    shipped = make_node("--params-file", str(SOURCE_CONFIG), "-p", "policy_backend:=remote")
    declare_parameters(shipped)
    assert ignored_by_remote_backend(shipped) == []
    remote = make_node("--params-file", str(SOURCE_CONFIG), "-p", "policy_backend:=remote",
                       "-p", "checkpoint:=/ckpt", "-p", "precision:=bf16", "-p", "seed:=3",
                       "-p", "action_space_mask:=[true, false]", "-p", "rate_hz:=5.0")
    declare_parameters(remote)
    assert ignored_by_remote_backend(remote) == ["checkpoint", "precision", "seed", "action_space_mask"]
    local = make_node("-p", "checkpoint:=/ckpt", "-p", "precision:=bf16")
    declare_parameters(local)
    assert ignored_by_remote_backend(local) == []
