# SPDX-License-Identifier: Apache-2.0
"""ROS adapters used outside the nodes: image messages, a live client."""
