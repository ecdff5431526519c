"""Start the Pi0.5 policy node (and, with demo:=true, the synthetic input sources).

    ros2 launch pi05_ros policy.launch.py checkpoint:=/ckpt/pi05_droid tokenizer:=/tok/paligemma_tokenizer.model
    ros2 launch pi05_ros policy.launch.py demo:=true            # random-weight model + synthetic inputs
    ros2 launch pi05_ros policy.launch.py params_file:=my_robot.yaml namespace:=arm denoise_steps:=5

Arguments left empty keep the value from params_file, so a params file is never overridden by a default.
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "pi05_ros"

# name -> (default, description)
ARGUMENTS: dict[str, tuple[object, str]] = {
    "checkpoint": ("", "openpi checkpoint directory or LeRobot model.safetensors; empty: from params_file "
                       "(which defaults to the built-in random-weight demo model)"),
    "tokenizer": ("", "PaliGemma SentencePiece model (paligemma_tokenizer.model); empty: from params_file"),
    "params_file": (PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "pi05.yaml"]),
                    "YAML file with the node's parameters"),
    "denoise_steps": ("", "flow-matching steps per chunk (1-100); empty: from params_file"),
    "precision": ("", "auto, fp32, bf16 or fp8; empty: from params_file"),
    "namespace": ("", "namespace of the nodes (and so of their relative topics)"),
    "demo": ("false", "true: run the random-weight demo model and start demo_sources for synthetic inputs"),
}


def _is_true(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


def _launch_nodes(context: LaunchContext) -> list[Node]:
    def value(name: str) -> str:
        return LaunchConfiguration(name).perform(context).strip()

    overrides: dict[str, object] = {}
    for name in ("checkpoint", "tokenizer", "precision"):
        if value(name):
            overrides[name] = value(name)
    if value("denoise_steps"):
        overrides["denoise_steps"] = int(value("denoise_steps"))
    demo = _is_true(value("demo"))
    if demo:
        overrides["demo"] = True

    namespace = value("namespace")
    nodes = [
        Node(
            package=PACKAGE,
            executable="policy_node",
            name="pi05_policy",
            namespace=namespace,
            parameters=[value("params_file"), overrides],
            output="screen",
            emulate_tty=True,
        )
    ]
    if demo:
        nodes.append(Node(package=PACKAGE, executable="demo_sources", name="pi05_demo_sources",
                          namespace=namespace, output="screen"))
    return nodes


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, (default, description) in ARGUMENTS.items()
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_launch_nodes)])
