# SPDX-License-Identifier: Apache-2.0
"""sage_ros: budgeted edge-cloud offloading of image classification for ROS 2."""

__version__ = '0.1.0'
