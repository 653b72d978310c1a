"""pipmm-edge's ROS 2 node: camera frames in, descriptions out (samples/ros2/README.md)."""
