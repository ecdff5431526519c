"""Proves the colcon message build: pi05_ros/msg/ActionChunk round-trips between two nodes over real DDS."""

from __future__ import annotations

import time

import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from ros_harness import unique_namespace

from pi05_ros.msg import ActionChunk


def test_action_chunk_round_trips_over_dds() -> None:
    context = Context()
    rclpy.init(context=context)
    try:
        namespace = unique_namespace("msg_smoke")  # apart from any other run that drew the same ROS domain
        talker = rclpy.create_node("chunk_talker", namespace=namespace, context=context)
        listener = rclpy.create_node("chunk_listener", namespace=namespace, context=context)
        received: list[ActionChunk] = []
        listener.create_subscription(ActionChunk, "smoke_chunk", received.append, 10)
        publisher = talker.create_publisher(ActionChunk, "smoke_chunk", 10)

        actions = np.arange(10 * 7, dtype=np.float32).reshape(10, 7) / 7.0
        sent = ActionChunk()
        sent.header.stamp.sec = 12
        sent.header.stamp.nanosec = 345
        sent.header.frame_id = "base"
        sent.joint_names = [f"joint_{i}" for i in range(7)]
        sent.horizon, sent.action_dim = actions.shape
        sent.action_dt = 0.02
        sent.actions = actions.ravel().tolist()
        sent.denoise_steps = 10
        sent.inference_latency = 0.125
        sent.sequence = 2**40
        sent.demo_model = True

        executor = SingleThreadedExecutor(context=context)
        executor.add_node(talker)
        executor.add_node(listener)
        deadline = time.monotonic() + 10.0  # discovery on loopback takes well under a second
        while not received and time.monotonic() < deadline:
            publisher.publish(sent)
            executor.spin_once(timeout_sec=0.1)
        executor.shutdown()

        assert received, "no ActionChunk arrived within 10 s"
        got = received[0]
        assert got.header.stamp.sec == 12 and got.header.stamp.nanosec == 345
        assert got.header.frame_id == "base"
        assert list(got.joint_names) == sent.joint_names
        assert (got.horizon, got.action_dim) == (10, 7)
        assert got.action_dt == 0.02 and got.inference_latency == 0.125  # float64 survives exactly
        assert got.denoise_steps == 10 and got.sequence == 2**40 and got.demo_model is True
        # float32[] arrives as array('f'): bit-exact to what was sent.
        np.testing.assert_array_equal(np.asarray(got.actions, dtype=np.float32).reshape(10, 7), actions)
    finally:
        rclpy.shutdown(context=context)
