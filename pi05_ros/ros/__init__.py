"""The ROS 2 side of pi05_ros: message conversions, input buffers, the inference worker and the node.

Modules here import rclpy / ROS message packages (except `conversions`, `params` constants and `inputs`,
which only need the message classes they are given); the engine never imports from here.
"""
