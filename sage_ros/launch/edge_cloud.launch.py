# SPDX-License-Identifier: Apache-2.0
"""Bring up sage_ros on a robot with a ROS 2 distribution.

    ros2 launch sage_ros edge_cloud.launch.py side:=edge namespace:=robot1 \
        camera_topic:=/camera/color/image_raw weights:=/ckpt/deit_tiny_patch16_224-a1311bcf.pth

side:=edge starts the edge node only (the robot), side:=cloud the router and the cloud node
(the server), side:=both everything on one machine.

Parameters take one route, the one `sage-ros up` takes: the package's config/sage_ros.yaml,
then `params_file:=` (your file in the same format, nav2 style: node keys such as
/**/sage_edge, /robot1/sage_edge, sage_router, or the namespace as root key), then the
arguments below. sage_ros.params.write_params_file merges them into one file keyed by each
node's full name, and every node gets that file, the router included. Empty arguments keep the
files' values.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable, Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from sage_ros.bringup import params_dir, side_nodes
from sage_ros.params import FASTDDS_PROFILE, load_params, parse_value, write_params_file

BOOL = ('true', 'false')
# name: (default, description, choices or None)
ARGS = {
    'side': ('both', 'edge: the edge node (robot); cloud: router and cloud node (server); both: all three',
             ('edge', 'cloud', 'both')),
    'namespace': ('', "the robot's namespace, of the edge node (e.g. robot1); the cloud serves every robot", None),
    'params_file': ('', 'your parameter file over the package config/sage_ros.yaml (node keys: /**/sage_edge, '
                        '/robot1/sage_edge, sage_router, ...); reaches every node, the router included', None),
    'camera_topic': ('', 'remaps the edge camera topic camera/image_raw (relative: resolved in the namespace)', None),
    'camera_transport': ('raw', 'raw: sensor_msgs/Image on camera/image_raw; compressed: CompressedImage on '
                                'camera/image_raw/compressed (camera_ros, image_transport)', ('raw', 'compressed')),
    'budget': ('', 'patch budget B per request (integer); setting it switches budget_mode to fixed', None),
    'budget_mode': ('', 'auto (the bandwidth monitor sets B) or fixed (B = budget)', None),
    'method': ('', 'selection method (sage, attention_topk, ...)', None),
    'eta': ('', 'gate threshold (float)', None),
    'weights': ('', 'weights of both models: checkpoint path, hub, or random', None),
    'edge_weights': ('', 'weights of the edge model only', None),
    'cloud_weights': ('', 'weights of the cloud model only', None),
    'zenoh_connect': ('', 'router endpoint(s) the edge and the cloud node connect to (e.g. tls/CLOUD_IP:7447)', None),
    'zenoh_listen': ('', 'endpoint(s) the router listens on (e.g. tcp/0.0.0.0:7447)', None),
    'zenoh_config': ('', 'Zenoh session config of the edge or cloud node (e.g. zenoh_robot1.json5 or '
                         'zenoh_cloud.json5 from sage-ros certs)', None),
    'router_zenoh_config': ('', "the router's Zenoh config (e.g. zenoh_router.json5 from sage-ros certs)", None),
    'use_sim_time': ('false', 'use /clock (bag replay with ros2 bag play --clock)', BOOL),
    'log_level': ('info', 'log level of every node', ('debug', 'info', 'warn', 'error', 'fatal')),
    'respawn': ('false', 'restart a node that dies (after 2 s); false: the whole launch stops with it', BOOL),
}

# Launch argument -> the parameters it sets ('name': every node that has it, 'node.name': one).
OVERRIDES = {
    'budget': ('sage_edge.budget',), 'budget_mode': ('sage_edge.budget_mode',), 'method': ('sage_edge.method',),
    'eta': ('sage_edge.eta',), 'weights': ('weights',), 'edge_weights': ('sage_edge.weights',),
    'cloud_weights': ('sage_cloud.weights',), 'zenoh_connect': ('zenoh_connect',),
    'zenoh_listen': ('sage_router.zenoh_listen',),
    'zenoh_config': ('sage_edge.zenoh_config', 'sage_cloud.zenoh_config'),
    'router_zenoh_config': ('sage_router.zenoh_config',), 'use_sim_time': ('use_sim_time',),
}
CAMERA = 'camera/image_raw'
EXECUTABLES = {'router': 'sage_router', 'cloud': 'sage_cloud', 'edge': 'sage_edge'}


def _overrides(arg):
    """Parameter overrides from the arguments, typed as the YAML's defaults; a wrong type names
    the argument (budget:=48.0 -> 'launch argument budget:=48.0: sage_edge.budget must be int')."""
    out = {}
    for name, keys in OVERRIDES.items():
        if not arg[name]:
            continue
        value = parse_value(arg[name])
        for key in keys:
            node = key.partition('.')[0] if '.' in key else None
            try:
                for n in [node] if node else ('sage_edge', 'sage_cloud', 'sage_router'):
                    load_params(n, overrides={key: value})
            except (TypeError, KeyError) as exc:
                raise RuntimeError(f'launch argument {name}:={arg[name]}: {exc.args[0]}') from None
            out[key] = value
    if arg['camera_transport'] == 'compressed':
        out.update({'sage_edge.image_topic': '', 'sage_edge.compressed_image_topic': CAMERA + '/compressed'})
    return out


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
    arg = {name: LaunchConfiguration(name).perform(context) for name in ARGS}
    names = side_nodes(arg['side'])
    namespace = arg['namespace'].strip('/')
    params_file = os.path.expanduser(arg['params_file']) if arg['params_file'] else None
    if params_file and not os.path.isfile(params_file):
        raise RuntimeError(f'launch argument params_file:={arg["params_file"]}: no such file')
    path = os.path.join(params_dir(), f'{arg["side"]}_{os.getpid()}.yaml')
    try:
        write_params_file(path, [EXECUTABLES[n] for n in names], namespaces={'sage_edge': namespace},
                          params_file=params_file, overrides=_overrides(arg))
    except (TypeError, KeyError) as exc:
        raise RuntimeError(f'params_file:={arg["params_file"]}: {exc.args[0]}') from None
    remap = []
    if arg['camera_topic']:
        remap = [(CAMERA, arg['camera_topic']), (CAMERA + '/compressed', arg['camera_topic'] + '/compressed')]
    respawn = arg['respawn'] == 'true'
    return [Node(package='sage_ros', executable=EXECUTABLES[n], name=EXECUTABLES[n],
                 namespace=namespace if n == 'edge' else '', parameters=[path],
                 remappings=remap if n == 'edge' else [], ros_arguments=['--log-level', arg['log_level']],
                 respawn=respawn, respawn_delay=2.0, on_exit=None if respawn else _stop_launch(EXECUTABLES[n]),
                 output='screen')
            for n in names]


def generate_launch_description():
    config = os.path.join(get_package_share_directory('sage_ros'), 'config')
    return LaunchDescription([
        *[DeclareLaunchArgument(name, default_value=default, description=desc, choices=list(choices) if choices
                                else None) for name, (default, desc, choices) in ARGS.items()],
        # Camera frames over 512 kB need Fast DDS's larger shared-memory segment (see the file);
        # export it for the camera driver's process too.
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE',
                               os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE',
                                              os.path.join(config, FASTDDS_PROFILE))),
        OpaqueFunction(function=_nodes),
    ])
