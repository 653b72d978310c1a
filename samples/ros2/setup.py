"""colcon / ament_python install of the node (a ROS 2 workspace); pipmm-edge itself comes from pip."""

from setuptools import setup

setup(
    name="pipmm_ros2",
    version="0.1.0",
    packages=["pipmm_ros2"],
    data_files=[("share/ament_index/resource_index/packages", ["resource/pipmm_ros2"]),
                ("share/pipmm_ros2", ["package.xml"]),
                ("share/pipmm_ros2/launch", ["launch/pipmm.launch.py"])],
    install_requires=["setuptools", "pipmm-edge"],
    entry_points={"console_scripts": ["pipmm_node = pipmm_ros2.node:main"]},
)
