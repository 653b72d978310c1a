"""ros2 launch pipmm_ros2 pipmm.launch.py bundle:=/path/to/bundle image_topic:=/camera/image_raw

For ROS 2 Humble and Jazzy workspaces (colcon build, then source install/setup.bash). Untested here:
`launch` and `launch_ros` are not on PyPI, so this machine and CI never run it; tests/test_ros2.py runs
the node itself. Every launch argument is the node parameter of the same name (pipmm_ros2/node.py).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

ARGUMENTS = {  # name -> default, as pipmm_ros2.node.PARAMETERS (kept in step by hand: launch cannot import it)
    "bundle": "", "prompt": "Describe the image.", "rate_hz": "1.0", "image_topic": "image",
    "compressed_topic": "image/compressed", "query_topic": "query", "answer_topic": "answer",
    "status_topic": "status", "device": "auto", "max_new_tokens": "0",
}
TYPES = {"rate_hz": float, "max_new_tokens": int}  # the others are strings ("" must stay "", not YAML's null)


def generate_launch_description():
    declared = [DeclareLaunchArgument(name, default_value=default) for name, default in ARGUMENTS.items()]
    parameters = {name: ParameterValue(LaunchConfiguration(name), value_type=TYPES.get(name, str)) for name in ARGUMENTS}
    return LaunchDescription(declared + [Node(package="pipmm_ros2", executable="pipmm_node", name="pipmm",
                                              output="screen", parameters=[parameters])])
