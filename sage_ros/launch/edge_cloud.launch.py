# SPDX-License-Identifier: Apache-2.0
"""Bring up sage_ros on a robot with a ROS 2 distribution.

    ros2 launch sage_ros edge_cloud.launch.py camera_topic:=/camera/color/image_raw \
        namespace:=robot1 side:=edge weights:=/ckpt/deit_tiny_patch16_224-a1311bcf.pth

Every default comes from config/sage_ros.yaml (the same file `sage-ros up` reads); launch
arguments left empty keep the file's values. side:=edge starts the edge node only (the robot),
side:=cloud the router and the cloud node (the server), side:=both everything on one machine.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

ARGS = {
    'side': ('both', 'edge, cloud or both'),
    'namespace': ('', 'robot namespace of the edge node (e.g. robot1)'),
    'params_file': ('', 'parameter file (default: the package config/sage_ros.yaml)'),
    'camera_topic': ('', 'camera sensor_msgs/Image topic (edge image_topic)'),
    'budget': ('', 'patch budget B'),
    'method': ('', 'selection method'),
    'eta': ('', 'gate threshold'),
    'weights': ('', 'weights of both models: checkpoint path, hub, or random'),
    'edge_weights': ('', 'weights of the edge model only'),
    'cloud_weights': ('', 'weights of the cloud model only'),
    'zenoh_connect': ('', 'router endpoint(s) the edge and cloud connect to'),
    'zenoh_listen': ('', 'endpoint(s) the router listens on'),
}


# Launch argument -> (edge parameter, type): ROS refuses a value whose type differs from the YAML's.
EDGE_ARGS = {'camera_topic': ('image_topic', str), 'budget': ('budget', int), 'method': ('method', str),
             'eta': ('eta', float), 'weights': ('weights', str), 'zenoh_connect': ('zenoh_connect', str)}


def _nodes(context):
    arg = {name: LaunchConfiguration(name).perform(context) for name in ARGS}
    config = os.path.join(get_package_share_directory('sage_ros'), 'config')
    params_file = arg['params_file'] or os.path.join(config, 'sage_ros.yaml')
    edge = {name: cast(arg[a]) for a, (name, cast) in EDGE_ARGS.items() if arg[a]}
    cloud = {k: arg[k] for k in ('weights', 'zenoh_connect') if arg[k]}
    if arg['edge_weights']:
        edge['weights'] = arg['edge_weights']
    if arg['cloud_weights']:
        cloud['weights'] = arg['cloud_weights']
    actions = []
    if arg['side'] in ('cloud', 'both'):
        router_params = {'zenoh_listen': arg['zenoh_listen']} if arg['zenoh_listen'] else {}
        actions.append(Node(package='sage_ros', executable='sage_router', name='sage_router',
                            arguments=['--config', config], parameters=[router_params], output='screen'))
        actions.append(Node(package='sage_ros', executable='sage_cloud', name='sage_cloud',
                            parameters=[params_file, cloud], output='screen'))
    if arg['side'] in ('edge', 'both'):
        actions.append(Node(package='sage_ros', executable='sage_edge', name='sage_edge',
                            namespace=arg['namespace'], parameters=[params_file, edge], output='screen'))
    return actions


def generate_launch_description():
    config = os.path.join(get_package_share_directory('sage_ros'), 'config')
    return LaunchDescription([
        *[DeclareLaunchArgument(name, default_value=default, description=desc)
          for name, (default, desc) in ARGS.items()],
        # Camera frames over 512 kB need Fast DDS's larger shared-memory segment (see the file).
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE',
                               os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE',
                                              os.path.join(config, 'fastdds_large_frames.xml'))),
        OpaqueFunction(function=_nodes),
    ])
