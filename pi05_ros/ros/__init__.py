"""The ROS 2 side of pi05_ros: message conversions, input buffers, the inference worker and the nodes.

`conversions`, `inputs`, `observation`, `schedule`, `problems`, `settings` and `worker` import no ROS package
(they take message objects and callables), so they also run where rclpy is missing; `params`, `diagnostics`,
`node`, `process`, `demo_sources` and `monitor` need rclpy. The engine never imports from here
(docs/architecture.md).
"""
