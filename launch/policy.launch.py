"""Start the Pi0.5 policy node (and, with demo:=true, the synthetic input sources).

    ros2 launch pi05_ros policy.launch.py checkpoint:=/ckpt/pi05_droid tokenizer:=/tok/paligemma_tokenizer.model
    ros2 launch pi05_ros policy.launch.py demo:=true            # random-weight model + synthetic inputs
    ros2 launch pi05_ros policy.launch.py params_file:=my_robot.yaml namespace:=arm denoise_steps:=5

Arguments left empty keep the value from params_file, so a params file is never overridden by a default.

pi05_policy is a managed (lifecycle) node. This file starts it with its own `autostart` off and drives the
transitions itself: configure (load + warm up the model) when the process starts, activate once it reached
`inactive`. `autostart:=false` leaves it unconfigured for a lifecycle manager (e.g. nav2_lifecycle_manager) or
`ros2 lifecycle set`. Only one side may drive it: a second configure in state inactive is not a transition.
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, LogInfo, OpaqueFunction, RegisterEventHandler
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition

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
    "policy_backend": ("", "local or remote (infer on the policy server at policy_server_url); empty: from "
                           "params_file"),
    "policy_server_url": ("", "remote: the policy server's websocket URL; empty: from params_file"),
    "namespace": ("", "namespace of the nodes (and so of their relative topics)"),
    "demo": ("", "true: run the random-weight demo model and start demo_sources for synthetic inputs; false: "
                 "neither, whatever params_file says; empty: from params_file (demo_sources not started)"),
    "autostart": ("true", "true: configure and activate the node from this launch file; false: leave it "
                          "unconfigured for a lifecycle manager"),
}


def _is_true(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


def _launch_nodes(context: LaunchContext) -> list[object]:
    def value(name: str) -> str:
        return LaunchConfiguration(name).perform(context).strip()

    overrides: dict[str, object] = {}
    for name in ("checkpoint", "tokenizer", "precision", "policy_backend", "policy_server_url"):
        if value(name):
            overrides[name] = value(name)
    if value("denoise_steps"):
        try:
            overrides["denoise_steps"] = int(value("denoise_steps"))
        except ValueError:
            raise ValueError(f"launch argument denoise_steps must be an integer in 1..100, got "
                             f"{value('denoise_steps')!r}") from None
    demo = _is_true(value("demo"))
    if value("demo"):
        overrides["demo"] = demo

    namespace = value("namespace")
    # The launch file drives the transitions (or a manager does), never the node itself: see the docstring.
    overrides["autostart"] = False
    policy = LifecycleNode(
        package=PACKAGE,
        executable="policy_node",
        name="pi05_policy",
        namespace=namespace,
        parameters=[value("params_file"), overrides],
        output="screen",
        emulate_tty=True,
    )
    entities: list[object] = []
    if _is_true(value("autostart")):
        def change(transition_id: int) -> EmitEvent:
            return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(policy),
                                               transition_id=transition_id))

        entities += [
            # Handlers first, so that no transition event is missed.
            RegisterEventHandler(OnStateTransition(
                target_lifecycle_node=policy, start_state="configuring", goal_state="inactive",
                entities=[LogInfo(msg="pi05_policy configured (model loaded); activating"),
                          change(Transition.TRANSITION_ACTIVATE)])),
            RegisterEventHandler(OnStateTransition(
                target_lifecycle_node=policy, goal_state="active",
                entities=[LogInfo(msg="pi05_policy active")])),
            policy,
            change(Transition.TRANSITION_CONFIGURE),
        ]
    else:
        entities.append(policy)
    if demo:
        entities.append(Node(package=PACKAGE, executable="demo_sources", name="pi05_demo_sources",
                             namespace=namespace, output="screen"))
    return entities


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, (default, description) in ARGUMENTS.items()
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_launch_nodes)])
