"""Plain-Python install (`pip install -e .`) of the engine and CLIs, for machines without ROS.

colcon ignores this file: the ROS package builds with ament_cmake from CMakeLists.txt (it owns msg/).
All metadata lives in setup.cfg.
"""

from setuptools import setup

setup()
