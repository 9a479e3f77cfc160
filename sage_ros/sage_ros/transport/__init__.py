# SPDX-License-Identifier: Apache-2.0
"""Robot-cloud transport over Zenoh, keyed and encoded like zenoh-bridge-ros2dds."""
