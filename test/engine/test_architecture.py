"""The import rules of docs/architecture.md, read from the source with `ast` (imports inside functions and under
TYPE_CHECKING count too): the engine knows no ROS and no server, the fast wing never imports the policy, the runner
contract sits below both, the server knows no ROS and only its Ray module knows Ray, and no two modules of the
package import each other, directly or around a circle."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "pi05_ros"
# Top-level names of ROS Python packages (rclpy, message and launch packages, the ament/rosidl tooling).
ROS_PACKAGES = {"rclpy", "rcl_interfaces", "rosidl_runtime_py", "rosidl_parser", "ament_index_python", "launch",
                "launch_ros", "std_msgs", "sensor_msgs", "diagnostic_msgs", "trajectory_msgs", "builtin_interfaces",
                "geometry_msgs", "lifecycle_msgs", "action_msgs", "rosgraph_msgs"}
# Ray Serve and the web framework it carries: only pi05_ros.serve.ray_app may import them.
RAY_PACKAGES = {"ray", "fastapi", "starlette", "uvicorn"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module `source` imports anywhere in its body; `from pkg import name` counts as pkg.name when that
    is a module of the package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
    return found


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """module -> modules it imports (all of them, inside the package or not)."""
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    known = set(files)
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the graph's own modules, as [a, b, ..., a], or None."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if nxt in on_stack:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def offenders(graph: dict[str, set[str]], importers: str, forbidden: Iterable[str]) -> list[str]:
    """'a imports b' for each module under `importers` that imports a module under one of `forbidden`."""
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    bad = tuple(forbidden)
    return [f"{module} imports {target}" for module, targets in sorted(graph.items()) if under(module, importers)
            for target in sorted(targets) if any(under(target, prefix) for prefix in bad)]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = import_graph()
    assert {"pi05_ros.engine.policy", "pi05_ros.engine.runner", "pi05_ros.engine.fast.pipeline",
            "pi05_ros.ros.node", "pi05_ros.serve.service", "pi05_ros.serve.ray_app"} <= set(found)
    return found


def test_the_engine_never_imports_ros(graph: dict[str, set[str]]) -> None:
    assert offenders(graph, "pi05_ros.engine", [*ROS_PACKAGES, "pi05_ros.ros", "pi05_ros.msg", "pi05_ros.cli",
                                                "pi05_ros.serve", *RAY_PACKAGES]) == []


def test_the_server_uses_the_engine_never_ros(graph: dict[str, set[str]]) -> None:
    assert offenders(graph, "pi05_ros.serve", [*ROS_PACKAGES, "pi05_ros.ros", "pi05_ros.msg", "pi05_ros.cli",
                                               "pi05_ros.execution"]) == []


def test_only_the_ray_module_imports_ray(graph: dict[str, set[str]]) -> None:
    """The one-process server and RemotePolicy run where Ray is not installed."""
    others = {name: targets for name, targets in graph.items() if name != "pi05_ros.serve.ray_app"}
    assert offenders(others, "pi05_ros", RAY_PACKAGES) == []


def test_the_execution_layer_imports_no_ros_and_of_the_engine_only_the_action_space(graph) -> None:
    """pi05_ros/execution/ holds the math of what reaches the robot: no ROS, no torch, no node (architecture.md)."""
    assert offenders(graph, "pi05_ros.execution", [*ROS_PACKAGES, "pi05_ros.ros", "pi05_ros.msg", "pi05_ros.cli",
                                                    "torch"]) == []
    engine_imports = {target for module, targets in graph.items() if module.startswith("pi05_ros.execution")
                      for target in targets if target.startswith("pi05_ros.engine")}
    assert engine_imports <= {"pi05_ros.engine.action_space"}, engine_imports


def test_the_fast_wing_never_imports_the_policy(graph: dict[str, set[str]]) -> None:
    assert offenders(graph, "pi05_ros.engine.fast", ["pi05_ros.engine.policy"]) == []


def test_the_runner_contract_sits_below_policy_and_both_runners(graph: dict[str, set[str]]) -> None:
    assert offenders(graph, "pi05_ros.engine.runner", ["pi05_ros.engine.policy", "pi05_ros.engine.fast"]) == []
    assert offenders(graph, "pi05_ros.engine.reference", ["pi05_ros.engine.runner", "pi05_ros.engine.policy",
                                                          "pi05_ros.engine.fast"]) == []


def test_the_command_line_tools_use_the_engine_not_the_node(graph: dict[str, set[str]]) -> None:
    assert offenders(graph, "pi05_ros.cli", [*ROS_PACKAGES, "pi05_ros.ros", "pi05_ros.msg"]) == []


def test_no_import_circles_in_the_package(graph: dict[str, set[str]]) -> None:
    assert find_cycle(graph) is None


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The rules above fail on a package that breaks them: imports inside functions, relative ones, circles."""
    package = tmp_path / "pkg"
    (package / "engine").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engine" / "__init__.py").write_text("")
    (package / "engine" / "a.py").write_text("def f():\n    from pkg.engine import b\n")
    (package / "engine" / "b.py").write_text("from . import c\n")
    (package / "engine" / "c.py").write_text("import rclpy\nfrom pkg.engine.a import f\n")
    graph = import_graph(package)
    assert graph["pkg.engine.a"] == {"pkg.engine.b"} and graph["pkg.engine.b"] == {"pkg.engine.c"}
    assert find_cycle(graph) == ["pkg.engine.a", "pkg.engine.b", "pkg.engine.c", "pkg.engine.a"]
    assert offenders(graph, "pkg.engine", ROS_PACKAGES) == ["pkg.engine.c imports rclpy"]
