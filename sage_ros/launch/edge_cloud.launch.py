# SPDX-License-Identifier: Apache-2.0
"""Bring up sage_ros on a robot with a ROS 2 distribution.

    ros2 launch sage_ros edge_cloud.launch.py side:=edge namespace:=robot1 \
        camera_topic:=/camera/color/image_raw weights:=/ckpt/deit_tiny_patch16_224-a1311bcf.pth

side:=edge starts the edge node only (the robot), side:=cloud the router and the cloud node
(the server), side:=both everything on one machine.

Parameters take one route, the one `sage-ros up` takes: the package's config/sage_ros.yaml,
then `params_file:=` (your file in the same format, nav2 style: node keys such as
/**/sage_edge, /robot1/sage_edge, sage_router, or the namespace as root key), then the
arguments below. sage_ros.nodes.launch_plan.launch_nodes merges them into one file keyed by each
node's full name, and every node gets that file, the router included. Empty arguments keep the
files' values.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable, Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from sage_ros.nodes.launch_plan import LAUNCH_ARGS, LaunchArgumentError, launch_nodes
from sage_ros.params import FASTDDS_PROFILE

# Only the translation into launch_ros actions lives here: which nodes start, with which
# parameter file, namespace and remappings, and every argument's meaning and error come from
# sage_ros.nodes.launch_plan.launch_nodes, which `sage-ros up` uses too and the tests run.


def _stop_launch(node):
    """on_exit of a node without respawn: the launch ends with it (exit code 1 if it failed)."""

    def on_exit(event, context):
        if context.is_shutdown:
            return None  # stopping anyway (Ctrl-C)
        if event.returncode == 0:
            return [Shutdown(reason=f'{node} exited')]
        raise RuntimeError(f'{node} exited with code {event.returncode}; stopping the launch '
                           '(respawn:=true restarts nodes instead)')

    return on_exit


def _nodes(context):
    args = {name: LaunchConfiguration(name).perform(context) for name in LAUNCH_ARGS}
    try:
        nodes = launch_nodes(args)
    except LaunchArgumentError as exc:
        raise RuntimeError(str(exc)) from None
    respawn = args['respawn'] == 'true'
    return [Node(package='sage_ros', executable=n.executable, name=n.executable, namespace=n.namespace,
                 parameters=[str(n.params_file)], remappings=list(n.remappings),
                 ros_arguments=['--log-level', n.log_level], respawn=respawn, respawn_delay=2.0,
                 on_exit=None if respawn else _stop_launch(n.executable), output='screen')
            for n in nodes]


def generate_launch_description():
    config = os.path.join(get_package_share_directory('sage_ros'), 'config')
    return LaunchDescription([
        *[DeclareLaunchArgument(name, default_value=default, description=desc, choices=list(choices) if choices
                                else None) for name, (default, desc, choices) in LAUNCH_ARGS.items()],
        # Camera frames over 512 kB need Fast DDS's larger shared-memory segment (see the file);
        # export it for the camera driver's process too.
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE',
                               os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE',
                                              os.path.join(config, FASTDDS_PROFILE))),
        OpaqueFunction(function=_nodes),
    ])
