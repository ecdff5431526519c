"""pi05_ros: the Pi0.5 vision-language-action policy as a ROS 2 package.

`pi05_ros.engine` is the inference engine (no ROS imports); `pi05_ros.ros` wraps it in a node.
"""

__version__ = "0.1.0"
