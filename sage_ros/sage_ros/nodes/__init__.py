# SPDX-License-Identifier: Apache-2.0
"""rclpy nodes: thin layers around sage_ros.core."""
