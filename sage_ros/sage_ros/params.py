# SPDX-License-Identifier: Apache-2.0
"""Reading the parameter YAML of config/ without ROS, with ROS-style ``name:=value`` overrides.

A user's parameter file is checked on the way (one line naming the file and the cause), and so
are topic names, with rclpy's own rules (imported only then)."""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import yaml

if TYPE_CHECKING:
    from sage_ros.core.answers import OffloadSettings
    from sage_ros.core.link import UplinkMonitor
    from sage_ros.core.offload import SelectionConfig
    from sage_ros.core.pipeline import GateConfig

CONFIG_FILE = 'sage_ros.yaml'
# Fast DDS profile with a 32 MB shared-memory segment, for camera frames over 512 kB.
FASTDDS_PROFILE = 'fastdds_large_frames.xml'


NODES = ('sage_edge', 'sage_cloud', 'sage_router')
# Parameters that name a ROS topic (every ``*_topic`` one; relative names resolve in the node's
# namespace), except these, which '' turns off.
TOPICS_OFF_WHEN_EMPTY = {'sage_edge': ('image_topic', 'compressed_image_topic', 'provisional_topic')}

_log = logging.getLogger(__name__)


class ParamsFileError(ValueError):
    """A parameter file that cannot be used; the message names the file and says why."""


def config_path(name: str, directory: Path | None = None) -> Path:
    """A file of the config directory (absolute names are kept)."""
    p = Path(name)
    return p if p.is_absolute() else (directory or config_dir()) / p


def config_dir() -> Path:
    """Directory of the shipped config: the source tree's, else the installed package share."""
    env = os.environ.get('SAGE_ROS_CONFIG_DIR')
    if env:
        return Path(env)
    src = Path(__file__).resolve().parents[1] / 'config'
    if (src / CONFIG_FILE).is_file():
        return src
    from ament_index_python.packages import get_package_share_directory  # only on installed setups

    return Path(get_package_share_directory('sage_ros')) / 'config'


def parse_value(text: str) -> Any:
    """A command-line value the way ROS reads one: YAML scalars (1, 1.5, true, 'abc')."""
    value = yaml.safe_load(text)
    return text if value is None else value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``['budget:=48', 'sage_edge.weights:=random']`` -> ``{'budget': 48, ...}``."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition(':=')
        if not sep or not name:
            raise ValueError(f'parameter override must look like name:=value, got {item!r}')
        out[name.strip()] = parse_value(value)
    return out


def _sections(doc: dict[str, Any], path: Path, prefix: str = '') -> Iterator[tuple[str, dict[str, Any]]]:
    """(node key, ros__parameters) of a parameter file, in file order; nested keys (nav2's
    ``robot1: {sage_edge: {ros__parameters: ...}}``, namespace as root key) are joined with '/'.
    A value outside ros__parameters is refused, as rcl refuses it: it would set nothing."""
    for key, value in doc.items():
        name = f'{prefix}/{str(key).strip("/")}'.replace('//', '/')
        if not isinstance(value, dict):
            raise ParamsFileError(f'params file {path}: {name.lstrip("/")!r} is not under a node key\'s '
                                  'ros__parameters (NODE: {ros__parameters: {NAME: VALUE}}, e.g. /**/sage_edge)')
        if 'ros__parameters' in value:
            params = value['ros__parameters']
            if not isinstance(params, (dict, type(None))):
                raise ParamsFileError(f'params file {path}: ros__parameters of {name!r} must map names to values, '
                                      f'got a {type(params).__name__}')
            yield name, dict(params or {})
        else:
            yield from _sections(value, path, name)


def _read_doc(path: Path) -> dict[str, Any]:
    """The node sections of a user's parameter file ({} when it is empty); ParamsFileError, in
    one line naming the file, when it cannot be read or is no parameter file."""
    path = Path(path)
    if path.is_dir():
        raise ParamsFileError(f'params file {path} is a directory, not a YAML parameter file')
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsFileError(f'params file {path} not found') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsFileError(f'cannot read params file {path}: {getattr(exc, "strerror", None) or exc}') from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        why = getattr(exc, 'problem', None) or getattr(exc, 'context', None) or type(exc).__name__
        raise ParamsFileError(f'params file {path} is not valid YAML: {why}{where}') from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ParamsFileError(f'params file {path} holds a {type(doc).__name__}; a parameter file maps node keys to '
                              'their parameters (/**/sage_edge: {ros__parameters: {NAME: VALUE}})')
    return doc


def params_file_warnings(path: Path) -> list[str]:
    """What in a user's parameter file sets nothing, one line each: an empty file, a node key
    that no sage_ros node can match (a typo such as /**/sage_edg). Raises ParamsFileError."""
    doc = _read_doc(path)
    if not doc:
        return [f'params file {path} is empty: it changes no parameter']
    out = []
    for key, _ in _sections(doc, path):
        last = key.rstrip('/').rpartition('/')[2]
        if last in ('*', '**') or last in NODES:
            continue
        close = difflib.get_close_matches(last, NODES, n=1)
        hint = f'; did you mean {key[: len(key) - len(last)] + close[0]!r}?' if close else ''
        out.append(f'params file {path}: node key {key!r} matches no sage_ros node ({", ".join(NODES)}), so its '
                   f'parameters are not used{hint}')
    return out


def _key_matches(key: str, fq_name: str) -> bool:
    """Does a parameter-file node key apply to the node ``fq_name`` ('/robot1/sage_edge')? As rcl
    reads it: ``*`` is one name token, ``**`` any number of them (``/**`` alone: every node)."""
    pattern = ''.join('(/[^/]+)*' if tok == '**' else '/[^/]+' if tok == '*' else '/' + re.escape(tok)
                      for tok in key.strip('/').split('/'))
    return re.fullmatch(pattern, fq_name) is not None


def fq_name(node: str, namespace: str = '') -> str:
    """'/robot1/sage_edge' from ('sage_edge', 'robot1')."""
    ns = namespace.strip('/')
    return f'/{ns}/{node}' if ns else f'/{node}'


def read_params_file(path: Path, node: str, *, namespace: str = '') -> dict[str, Any]:
    """The parameters a ROS parameter file gives ``node`` in ``namespace``: every section whose
    key matches the node, in file order (later ones win), as rcl merges them."""
    out: dict[str, Any] = {}
    for key, params in _sections(_read_doc(path), Path(path)):
        if _key_matches(key, fq_name(node, namespace)):
            out.update(params)
    return out


def load_params(
    node: str, *, directory: Path | None = None, overrides: dict[str, Any] | None = None,
    params_file: Path | None = None, namespace: str = '',
) -> dict[str, Any]:
    """Parameters of ``node``: the shipped YAML's defaults, then ``params_file`` (a user's file
    in the same format: node keys with wildcards or a namespace, as rcl reads them), then
    ``overrides``.

    An override ``name`` applies to every node that has the parameter; ``node.name`` to one.
    Unknown names are errors, so a typo never passes silently. Setting ``budget`` (in the file
    or as an override) without ``budget_mode`` means the user wants that B: budget_mode becomes
    ``fixed``, as ``ros2 param set /sage_edge budget 48`` does at run time.
    """
    path = (directory or config_dir()) / CONFIG_FILE
    with path.open() as fh:
        doc = yaml.safe_load(fh) or {}
    section = doc.get(f'/**/{node}', doc.get(node))
    if not isinstance(section, dict) or 'ros__parameters' not in section:
        raise KeyError(f'{path} has no ros__parameters for node {node!r}')
    params = dict(section['ros__parameters'])
    given: set[str] = set()

    def put(key: str, value: Any, source: str) -> None:
        expected = type(params[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected):
            raise TypeError(f'{node}.{key} must be {expected.__name__}, got {value!r}{source}')
        params[key] = value
        given.add(key)

    if params_file is not None:
        for key, value in read_params_file(params_file, node, namespace=namespace).items():
            if key not in params:
                raise KeyError(f'{params_file}: node {node!r} has no parameter {key!r} (see {path})')
            put(key, value, f' (in {params_file})')
    # Node-qualified overrides last, so they win over the unqualified ones.
    for name, value in sorted((overrides or {}).items(), key=lambda kv: '.' in kv[0]):
        target, _, key = name.rpartition('.')
        if target and target != node:
            continue
        if key not in params:
            if target:
                raise KeyError(f'node {node!r} has no parameter {key!r} (see {path})')
            continue
        put(key, value, '')
    if 'budget' in given and 'budget_mode' in params and 'budget_mode' not in given:
        params['budget_mode'] = 'fixed'
    return params


def write_params_file(
    out: Path, nodes: Iterable[str], *, namespaces: dict[str, str] | None = None,
    directory: Path | None = None, params_file: Path | None = None, overrides: dict[str, Any] | None = None,
) -> Path:
    """Write the complete parameters of ``nodes`` to ``out``, keyed by each node's fully
    qualified name ('/robot1/sage_edge'), from :func:`load_params`.

    The one route of parameters: the launch file, ``sage-ros up`` and the router all hand the
    nodes this file (``--params-file``), and ``ros2 param dump`` of a running node gives it back.
    """
    namespaces = namespaces or {}
    if params_file is not None:
        for warning in params_file_warnings(params_file):
            _log.warning(warning)
    doc = {}
    for node in nodes:
        ns = namespaces.get(node, '')
        params = load_params(node, directory=directory, overrides=overrides, params_file=params_file, namespace=ns)
        check_topics(node, params, namespace=ns)
        doc[fq_name(node, ns)] = {'ros__parameters': params}
    out = Path(out)
    out.write_text('# Written by sage_ros from config/sage_ros.yaml, a params_file and overrides.\n'
                   + yaml.safe_dump(doc, sort_keys=False))
    return out


def check_topics(node: str, params: dict[str, Any], *, namespace: str = '') -> None:
    """Refuse a topic parameter that rcl would refuse when the node creates its publisher or
    subscription, in one line naming it ('' only where it turns the topic off). rcl's own rules:
    the name as written, then expanded in the node's namespace ('~', '{node}')."""
    from rclpy.exceptions import NameValidationException
    from rclpy.expand_topic_name import expand_topic_name
    from rclpy.validate_full_topic_name import validate_full_topic_name
    from rclpy.validate_topic_name import validate_topic_name

    for name, value in params.items():
        if not name.endswith('_topic') or (value == '' and name in TOPICS_OFF_WHEN_EMPTY.get(node, ())):
            continue
        try:
            validate_topic_name(value)
            validate_full_topic_name(expand_topic_name(value, node, '/' + namespace.strip('/')))
        except (NameValidationException, ValueError) as exc:
            # rclpy's message: 'Invalid topic name: WHY:', then the name and a caret below it.
            why = str(exc).splitlines()[0].rstrip(':').removeprefix('Invalid topic name: ')
            raise ValueError(f'{node}.{name}: {value!r} is not a valid ROS topic name ({why})') from None


def check_overrides_known(overrides: dict[str, Any], nodes: Iterable[str], *, directory: Path | None = None) -> None:
    """Raise when an unqualified override matches no node's parameter."""
    known: set[str] = set()
    for node in nodes:
        known |= set(load_params(node, directory=directory))
    for name in overrides:
        if '.' not in name and name not in known:
            raise KeyError(f'no node has a parameter {name!r}')


def offload_settings(edge: dict[str, Any]) -> OffloadSettings:
    """The core's OffloadSettings (offloads and second rounds) from sage_edge parameters."""
    from sage_ros.core.answers import OffloadSettings

    return OffloadSettings(deadline_s=edge['deadline_ms'] / 1e3, second_round=edge['second_round'],
                           budget_max=int(edge['budget_max']), selection=selection_config(edge),
                           byte_budget=int(edge['byte_budget']))


def selection_config(edge: dict[str, Any]) -> SelectionConfig:
    """The core's SelectionConfig from sage_edge parameters."""
    # Imported here: the router reads parameters too and must not pay for torch.
    from sage_ros.core.offload import SelectionConfig

    return SelectionConfig(
        method=edge['method'],
        prefilter_ratio=float(edge['prefilter_ratio']),
        seed=int(edge['seed']),
        encoding=edge['codec'],
        quality=int(edge['jpeg_quality']),
        method_params=method_params(edge).get(edge['method'], {}),
    )


def method_params(edge: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each selection method's own parameters, from sage_edge parameters."""
    return {'attention_threshold': {'delta': float(edge['delta'])},
            'attention_sum': {'delta_sum': float(edge['delta_sum'])},
            'bat': {'attentive_share': float(edge['bat_attentive_share']), 'k': int(edge['bat_k'])}}


def gate_config(edge: dict[str, Any]) -> GateConfig:
    """The core's GateConfig from sage_edge parameters."""
    from sage_ros.core.pipeline import GateConfig

    return GateConfig(crop_pct=float(edge['crop_pct']), embedding_source=edge['embedding_source'],
                      gate_metric=edge['gate_metric'], eta=float(edge['eta']), topk=int(edge['topk']))


def uplink_monitor(edge: dict[str, Any], *, connected: bool = True) -> UplinkMonitor:
    """The bandwidth monitor, budget controller and in-flight window from sage_edge parameters."""
    from sage_ros.core.link import BudgetController, UplinkMonitor

    controller = BudgetController(deadline_s=edge['deadline_ms'] / 1e3, budget_min=edge['budget_min'],
                                  budget_max=edge['budget_max'], safety=edge['budget_safety'])
    return UplinkMonitor(controller, probe_interval_s=edge['probe_interval_s'], probe_bytes=edge['probe_bytes'],
                         max_in_flight=edge['max_in_flight'], connected=connected)


def starting_budget(edge: dict[str, Any]) -> int:
    """B of the first offloaded frame: the parameter in fixed mode, else the controller's start
    (budget_max, corrected by the first answers). What an offline run uses for every frame."""
    if edge['budget_mode'] == 'fixed':
        return int(edge['budget'])
    return uplink_monitor(edge).budget
