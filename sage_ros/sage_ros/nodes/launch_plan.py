# SPDX-License-Identifier: Apache-2.0
"""Which nodes a side runs, each with its parameter file, namespace and remappings.

One plan for ``ros2 launch sage_ros edge_cloud.launch.py`` and ``sage-ros up``: the launch file
only turns each :class:`NodeLaunch` into a ``launch_ros`` ``Node`` action, and ``sage-ros up``
into a process (:meth:`NodeLaunch.ros_args`). Everything else, the launch arguments' meaning
and their errors included, is here, where tests run it (``ros2 launch`` itself is on no
package registry, so it cannot run on machines without a ROS distribution).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sage_ros.params import load_params, parse_value, write_params_file

SIDES = ('edge', 'cloud', 'both')
# short name -> (ROS node name = executable, module run by `sage-ros up`)
NODES = {
    'router': ('sage_router', 'sage_ros.nodes.router_node'),
    'cloud': ('sage_cloud', 'sage_ros.nodes.cloud_node'),
    'edge': ('sage_edge', 'sage_ros.nodes.edge_node'),
}
CAMERA = 'camera/image_raw'
"""The edge's camera topic, relative: resolved in its namespace, remapped by camera_topic."""

_BOOL = ('true', 'false')
# Launch arguments, name: (default, description, choices or None). `ros2 launch --show-args`
# prints these; launch_nodes() gives them their meaning.
LAUNCH_ARGS: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    'side': ('both', 'edge: the edge node (robot); cloud: router and cloud node (server); both: all three', SIDES),
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
    'use_sim_time': ('false', 'use /clock (bag replay with ros2 bag play --clock)', _BOOL),
    'log_level': ('info', 'log level of every node', ('debug', 'info', 'warn', 'error', 'fatal')),
    'respawn': ('false', 'restart a node that dies (after 2 s); false: the whole launch stops with it', _BOOL),
}
# Launch argument -> the parameters it sets ('name': every node that has it, 'node.name': one).
_ARG_PARAMS = {
    'budget': ('sage_edge.budget',), 'budget_mode': ('sage_edge.budget_mode',), 'method': ('sage_edge.method',),
    'eta': ('sage_edge.eta',), 'weights': ('weights',), 'edge_weights': ('sage_edge.weights',),
    'cloud_weights': ('sage_cloud.weights',), 'zenoh_connect': ('zenoh_connect',),
    'zenoh_listen': ('sage_router.zenoh_listen',),
    'zenoh_config': ('sage_edge.zenoh_config', 'sage_cloud.zenoh_config'),
    'router_zenoh_config': ('sage_router.zenoh_config',), 'use_sim_time': ('use_sim_time',),
}


class LaunchArgumentError(ValueError):
    """A launch argument (or a file it names) that cannot be used; the message names it."""


@dataclass(frozen=True)
class NodeLaunch:
    """One node to start: the same for ``ros2 launch`` and ``sage-ros up``."""

    key: str
    """'router', 'cloud' or 'edge'."""
    executable: str
    """The console script, also the node's name ('sage_edge')."""
    module: str
    """What ``python -m`` runs for it where no ROS distribution installed the script."""
    namespace: str
    params_file: Path
    remappings: tuple[tuple[str, str], ...] = ()
    log_level: str = ''
    """'' = rcl's default."""

    def ros_args(self) -> list[str]:
        """Its ``--ros-args`` as ``launch_ros`` builds them for a ``Node`` action."""
        args = ['--ros-args', '--params-file', str(self.params_file)]
        if self.log_level:
            args += ['--log-level', self.log_level]
        if self.namespace:
            args += ['-r', f'__ns:=/{self.namespace}']
        for old, new in self.remappings:
            args += ['-r', f'{old}:={new}']
        return args


def side_nodes(side: str) -> list[str]:
    """The processes of one side, in start order: router and cloud for 'cloud', edge for 'edge'."""
    if side not in SIDES:
        raise ValueError(f'side must be one of {", ".join(SIDES)}, got {side!r}')
    return {'edge': ['edge'], 'cloud': ['router', 'cloud'], 'both': ['router', 'cloud', 'edge']}[side]


def params_dir() -> Path:
    """A directory of this process for the parameter files it writes, removed at exit."""
    global _PARAMS_DIR
    if _PARAMS_DIR is None:
        _PARAMS_DIR = Path(tempfile.mkdtemp(prefix='sage_ros_params_'))
        atexit.register(shutil.rmtree, _PARAMS_DIR, True)
    return _PARAMS_DIR


_PARAMS_DIR: Path | None = None


def plan_nodes(
    side: str = 'both',
    *,
    namespace: str = '',
    directory: Path | None = None,
    overrides: dict[str, Any] | None = None,
    params_file: Path | None = None,
    camera_topic: str = '',
    log_level: str = '',
) -> list[NodeLaunch]:
    """The nodes of one side, in start order, all given one parameter file written by
    :func:`sage_ros.params.write_params_file` (the shipped YAML, ``params_file``, then
    ``overrides``). ``namespace`` is the edge's; ``camera_topic`` remaps its camera topics."""
    keys = side_nodes(side)
    namespace = namespace.strip('/')
    fd, path = tempfile.mkstemp(prefix=f'{side}_', suffix='.yaml', dir=params_dir())
    os.close(fd)
    write_params_file(Path(path), [NODES[k][0] for k in keys], namespaces={'sage_edge': namespace},
                      directory=directory, params_file=params_file, overrides=overrides or {})
    remap: tuple[tuple[str, str], ...] = ()
    if camera_topic:
        remap = ((CAMERA, camera_topic), (CAMERA + '/compressed', camera_topic + '/compressed'))
    return [NodeLaunch(key=k, executable=NODES[k][0], module=NODES[k][1], namespace=namespace if k == 'edge' else '',
                       params_file=Path(path), remappings=remap if k == 'edge' else (), log_level=log_level)
            for k in keys]


def launch_overrides(args: Mapping[str, str]) -> dict[str, Any]:
    """Parameter overrides from launch arguments, typed as the YAML's defaults; a wrong type
    names the argument ('launch argument budget:=48.0: sage_edge.budget must be int, got 48.0')."""
    out: dict[str, Any] = {}
    for name, keys in _ARG_PARAMS.items():
        if not args.get(name):
            continue
        value = parse_value(args[name])
        for key in keys:
            node = key.partition('.')[0] if '.' in key else None
            try:
                for n in [node] if node else [NODES[k][0] for k in NODES]:
                    load_params(n, overrides={key: value})
            except (TypeError, KeyError, ValueError) as exc:
                raise LaunchArgumentError(f'launch argument {name}:={args[name]}: {exc.args[0]}') from None
            out[key] = value
    if args.get('camera_transport') == 'compressed':
        out.update({'sage_edge.image_topic': '', 'sage_edge.compressed_image_topic': CAMERA + '/compressed'})
    return out


def launch_nodes(args: Mapping[str, str]) -> list[NodeLaunch]:
    """What ``ros2 launch sage_ros edge_cloud.launch.py`` starts for these arguments (values as
    typed; missing ones take :data:`LAUNCH_ARGS`' defaults). Raises LaunchArgumentError."""
    unknown = sorted(set(args) - set(LAUNCH_ARGS))
    if unknown:
        raise LaunchArgumentError(f'unknown launch argument(s): {", ".join(unknown)}')
    arg = {name: str(args.get(name, default)) for name, (default, _, _) in LAUNCH_ARGS.items()}
    for name, (_, _, choices) in LAUNCH_ARGS.items():
        if choices and arg[name] not in choices:
            raise LaunchArgumentError(f'launch argument {name}:={arg[name]}: must be one of {", ".join(choices)}')
    params_file = Path(os.path.expanduser(arg['params_file'])) if arg['params_file'] else None
    if params_file is not None and not params_file.exists():  # a directory: refused as `up` refuses it
        raise LaunchArgumentError(f'launch argument params_file:={arg["params_file"]}: no such file')
    overrides = launch_overrides(arg)
    try:
        return plan_nodes(arg['side'], namespace=arg['namespace'], params_file=params_file, overrides=overrides,
                          camera_topic=arg['camera_topic'], log_level=arg['log_level'])
    except (TypeError, KeyError, ValueError) as exc:
        raise LaunchArgumentError(f'params_file:={arg["params_file"]}: {exc.args[0]}') from None
