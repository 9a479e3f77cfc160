# SPDX-License-Identifier: Apache-2.0
"""``sage-ros`` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sage_ros.core.errors import SageError
from sage_ros.params import NODES, check_overrides_known, load_params, parse_overrides


def _add_param_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--config', type=Path, default=None, help='directory holding sage_ros.yaml (default: shipped config/)')
    p.add_argument('-p', '--param', action='append', default=[], metavar='NAME:=VALUE',
                   help='override a parameter, ROS style; NODE.NAME for one node (e.g. -p budget:=48 '
                        '-p sage_cloud.weights:=/ckpt/deit_base.pth)')
    p.add_argument('--weights', default=None,
                   help='shorthand for -p weights:=VALUE on every node (a checkpoint, hub, or random)')


def _overrides(args: argparse.Namespace) -> dict:
    overrides = parse_overrides(args.param)
    if args.weights is not None:
        overrides.setdefault('weights', args.weights)
    check_overrides_known(overrides, NODES, directory=args.config)
    return overrides


def _params(args: argparse.Namespace) -> tuple[dict, dict]:
    overrides = _overrides(args)
    return (load_params('sage_edge', directory=args.config, overrides=overrides),
            load_params('sage_cloud', directory=args.config, overrides=overrides))


def _cmd_demo(args: argparse.Namespace) -> int:
    from sage_ros.commands.images import ImageReader, demo_images
    from sage_ros.core.preflight import check_models

    edge, cloud = _params(args)
    images = demo_images(args.images, args.limit)
    check_models(edge, cloud)
    if args.offline:
        from sage_ros.commands.demo import run_demo

        reader = ImageReader(images)
        run_demo(reader.frames(), edge, cloud, skipped=reader.skipped)
        return 0
    from sage_ros.commands.system_demo import run_system_demo

    summary = run_system_demo(images, _overrides(args), directory=args.config.resolve() if args.config else None,
                              edge_params=edge, log_path=args.log)
    return 0 if summary['results'] == summary['frames'] else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.fleet:
        from sage_ros.bench.fleet import batching, fleet_scale, flood_fairness, many_prefixes, ray_replicas

        overrides = {'weights': args.weights, **parse_overrides(args.param)}
        check_overrides_known(overrides, NODES)
        images = args.images or Path(os.environ.get('SAGE_ROS_DATA', 'data')) / 'images'
        parts = {'fairness': lambda: flood_fairness(images, overrides=overrides),
                 'scale': lambda: fleet_scale(images, overrides=overrides),
                 'prefixes': lambda: many_prefixes(images, overrides=overrides),
                 'batching': lambda: batching(images, overrides=overrides),
                 'ray': lambda: ray_replicas(images)}
        for part in (args.fleet_part or list(parts)):
            parts[part]()
        return 0
    if args.robot:
        from sage_ros.bench.robot import run_robot_bench

        if args.param:
            raise ValueError('-p applies to --pipeline and --fleet only')
        log = args.log.open('w') if args.log else None
        try:
            run_robot_bench(args.images, edge_onnx=args.edge_onnx, log=log)
        finally:
            if log is not None:
                log.close()
        return 0
    if args.pipeline:
        from sage_ros.bench.pipeline import run_from_args

        overrides = {'weights': args.weights, **parse_overrides(args.param)}
        check_overrides_known(overrides, NODES)
        run_from_args(args, args.images, overrides)
        return 0
    if args.images is None:
        raise ValueError('IMAGES is required (or --pipeline)')
    if args.param:
        raise ValueError('-p applies to --pipeline only')
    if args.edge_runtimes:
        from sage_ros.bench.edge import run_edge_runtime_bench

        run_edge_runtime_bench(args.images, n_images=args.n_images, weights=args.weights,
                               threads=tuple(args.threads))
        return 0
    from sage_ros.bench.micro import run_bench

    run_bench(args.images, n_images=args.n_images, repeat=args.repeat, weights=args.weights)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from sage_ros.commands.bringup import plan, run_up

    overrides = _overrides(args)
    directory = args.config.resolve() if args.config else None
    return run_up(plan(args.side, namespace=args.namespace, directory=directory, overrides=overrides,
                       params_file=args.params_file), directory=directory)


def _cmd_export_edge(args: argparse.Namespace) -> int:
    from sage_ros.commands.export import export_edge_model

    edge = load_params('sage_edge', directory=args.config)
    export_edge_model(args.model or edge['model'], args.weights or edge['weights'], args.output, int8=args.int8)
    return 0


def _cmd_bag(args: argparse.Namespace) -> int:
    from sage_ros.eval.bags import labeled_images_from_folder, write_image_bag

    items = labeled_images_from_folder(args.images, labels=args.labels, limit=args.limit)
    n = write_image_bag(items, args.output, storage=args.storage, image_topic=args.image_topic,
                        label_topic=args.label_topic, rate_hz=args.rate, compressed=args.compressed,
                        progress=sys.stderr.isatty())
    labelled = sum(item.label is not None for item in items)
    kind = 'jpeg CompressedImage' if args.compressed else 'rgb8 Image'
    print(f'bag: {n} frames ({kind}), {labelled} labelled, {args.storage}, {args.output}')
    return 0


def _csv(cast):
    def parse(text: str) -> list:
        try:
            return [cast(v) for v in text.split(',') if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a comma-separated list of {cast.__name__}, got {text!r}')
    return parse


def _cmd_eval(args: argparse.Namespace) -> int:
    from sage_ros.eval.bags import count_frames

    count_frames(args.bag)  # a missing or image-less bag, before anything heavy is imported
    from sage_ros.eval.run import run_eval, sweep_config

    edge, cloud = _params(args)
    if args.second_k is not None and not args.second_round:
        raise ValueError('--second-k applies with --second-round only')
    cfg = sweep_config(edge, cloud, methods=args.methods, budgets=args.budgets, etas=args.eta, codecs=args.codecs,
                       quality=args.quality, prefilter_ratios=args.prefilter_ratios, limit=args.limit,
                       second_rounds=args.second_round,
                       second_ks=args.second_k, eta_clouds=args.eta_cloud)
    run_eval(args.bag, cfg, args.out, cache_path=args.cache, progress=not args.no_progress, figures=args.figures)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from sage_ros.eval.bags import count_frames

    count_frames(args.bag)  # a missing or image-less bag, before anything heavy is imported
    from sage_ros.eval.replay import replay_live, replay_offline

    edge, cloud = _params(args)
    if args.live:
        summary = replay_live(args.bag, rate=args.rate, out=args.out, storage=args.storage,
                              image_topic=edge['image_topic'], result_topic=edge['result_topic'],
                              namespace=args.namespace, limit=args.limit, wait_edge_s=args.wait_edge)
        return 0 if summary['results'] > 0 else 1
    if args.namespace:
        raise ValueError('--namespace applies with --live only')
    from sage_ros.core.preflight import check_models

    check_models(edge, cloud)
    replay_offline(args.bag, edge, cloud, out=args.out, storage=args.storage, limit=args.limit)
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from sage_ros.commands.certs import DeploymentError, write_deployment

    try:
        files = write_deployment(args.out, robots=args.robots, cloud_hosts=args.cloud_host, port=args.port,
                                 force=args.force)
    except DeploymentError as exc:
        print(f'sage-ros certs: {exc}', file=sys.stderr)
        return 2
    print(f'wrote {len(files)} files to {args.out}: a CA, certificates, keys (0600), credentials and Zenoh configs')
    for name, path in files.items():
        print(f'  {name:<16} {path}')
    print('Keep *.key, credentials.txt and *_usrpwd.json5 private; give each robot only its own files and ca.pem.')
    return 0


class _DefaultsHelp(argparse.HelpFormatter):
    """--help names each option's default, unless its help already does or there is none to name
    (no value, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        default = action.default
        if (not action.option_strings or 'default' in text or default is None or default is False
                or default is argparse.SUPPRESS or (isinstance(default, (str, list)) and not default)):
            return text
        shown = ','.join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f'{text} (default: {shown.replace("%", "%%")})'


class _Parser(argparse.ArgumentParser):
    """Every subcommand's parser too (argparse makes them of the parent's class)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault('formatter_class', _DefaultsHelp)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog='sage-ros', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help='the system end to end on real images',
                          description='Bring up router, cloud node and edge node, publish real images as '
                                      'sensor_msgs/Image on the camera topic, print each OffloadResult and a '
                                      'summary. --offline runs the same decisions in-process, without ROS.')
    demo.add_argument('images', nargs='?', type=Path, default=None,
                      help="folder of images (labels from its or its parent's labels.csv); "
                           "default: scikit-image's sample photographs")
    demo.add_argument('--limit', type=int, default=0, help='at most this many images (0: all)')
    demo.add_argument('--offline', action='store_true',
                      help='run the core library in this process instead of the ROS system')
    demo.add_argument('--log', type=Path, default=None,
                      help='write the nodes\' logs to this file (default: not kept)')
    _add_param_args(demo)
    demo.set_defaults(func=_cmd_demo)

    up = sub.add_parser('up', help='bring up the system (router, cloud, edge) as processes, from config/',
                        description='What `ros2 launch sage_ros edge_cloud.launch.py` does, for machines '
                                    'without a ROS distribution. Ctrl-C or SIGTERM stops everything (exit code 0). '
                                    'When a process fails, the others are stopped too, with one line saying '
                                    'which and why (exit code 2 for a configuration it cannot start with, else 1).')
    up.add_argument('--side', choices=('edge', 'cloud', 'both'), default='both',
                    help='edge: the edge node; cloud: router and cloud node; both (default)')
    up.add_argument('--namespace', default='', help='robot namespace of the edge node (e.g. robot1)')
    up.add_argument('--params-file', type=Path, default=None,
                    help='your parameter file (ROS format, node keys: /**/sage_edge, /robot1/sage_edge, '
                         'sage_router, ...) over the shipped sage_ros.yaml; the launch file\'s params_file')
    _add_param_args(up)
    up.set_defaults(func=_cmd_up)

    bench = sub.add_parser('bench', help='speed and size figures of the core on real images',
                           description='Edge forward, selection per method and budget, codec bytes and '
                                       'times, server subset forward vs all 196 patches. --pipeline: the '
                                       'system with the edge behind a delay relay, camera frames at 30 fps, '
                                       'nothing offloaded vs a third offloaded: frames handled per second, '
                                       'latencies by source, in-flight window and CPU per process.')
    bench.add_argument('images', nargs='?', type=Path, default=None,
                       help='folder of real images (e.g. imagenet-val-1300/images); with --pipeline '
                            'default $SAGE_ROS_DATA/images')
    bench.add_argument('--n-images', type=int, default=50, help='images to measure over')
    bench.add_argument('--repeat', type=int, default=20, help='timed repetitions per figure')
    bench.add_argument('--weights', default='random', help='weights of both models (speed does not depend on them)')
    bench.add_argument('--pipeline', action='store_true',
                       help='the pipeline benchmark instead: brings up its own router, cloud and edge '
                            '(options below)')
    bench.add_argument('--edge-runtimes', action='store_true',
                       help='the edge on torch vs ONNX Runtime FP32 vs int8 instead: per-frame time and resident '
                            'memory, interleaved, as ratios to torch, and how far int8 drifts (SAGE sets, gate)')
    bench.add_argument('--threads', type=_csv(int), default=[1, 2],
                       help='--edge-runtimes: comma-separated thread counts (default: 1,2)')
    bench.add_argument('--fleet', action='store_true',
                       help='the fleet cloud instead: fairness while one robot floods at 5x the measured capacity, '
                            '100/200/500 robots, 10,000 robot keys, answers/s by max_batch, Ray replicas')
    bench.add_argument('--fleet-part', action='append', default=[],
                       choices=('fairness', 'scale', 'prefixes', 'batching', 'ray'),
                       help='--fleet: run only this part (repeatable; default: all). fairness takes the cloud\'s '
                            'model (-p sage_cloud.model:=...); scale and prefixes a DeiT-Tiny server unless -p sets one')
    bench.add_argument('--robot', action='store_true',
                       help='what a robot pays instead: resident memory of each process kind of sage-ros up '
                            '(supervisor, router, cloud, edge on torch and on ONNX Runtime), a 12 MP JPEG '
                            'frame decoded at full size vs the reduced scale the edge uses, and the camera\'s '
                            'results per second while such frames arrive at 1 and 5 Hz (about 2 minutes)')
    bench.add_argument('--edge-onnx', type=Path, default=None,
                       help='--robot: the exported edge model to measure (default: export one, random weights)')
    bench.add_argument('-p', '--param', action='append', default=[], metavar='NAME:=VALUE',
                       help='--pipeline: node parameter override, ROS style (e.g. -p max_in_flight:=8)')
    from sage_ros.bench.pipeline import add_arguments as add_pipeline_arguments

    add_pipeline_arguments(bench.add_argument_group('--pipeline options'))
    bench.set_defaults(func=_cmd_bench)

    export = sub.add_parser('export-edge', help='write the edge model as ONNX, for an edge on ONNX Runtime (no torch)',
                            description='Runs where torch is (workstation or cloud). Writes the edge\'s one pass '
                                        '(softmax, last-layer CLS attention, patch embeddings) as a .onnx file whose '
                                        'metadata carries what the robot needs (model, weights provenance, input '
                                        'transform, patch grid, classes), checks it against torch, and prints how '
                                        'to point the edge at it (sage_edge weights).')
    export.add_argument('-o', '--output', type=Path, required=True, help='the .onnx file to write')
    export.add_argument('--model', default=None, help='timm model (default: sage_edge model of the config)')
    export.add_argument('--weights', default=None,
                        help='checkpoint, hub, hf-hub:..., or random[:SEED] (default: sage_edge weights of the config)')
    export.add_argument('--int8', action='store_true',
                        help='also write NAME.int8.onnx, its weights quantised to int8 (ONNX Runtime dynamic quantisation)')
    export.add_argument('--config', type=Path, default=None,
                        help='directory holding sage_ros.yaml (default: shipped config/)')
    export.set_defaults(func=_cmd_export_edge)

    bag = sub.add_parser('bag', help='record a folder of images as a rosbag2 bag with ground-truth labels',
                         description='One sensor_msgs/Image per image at --rate, and a sage_ros_msgs/FrameLabel '
                                     'with the same stamp for each labelled one (labels from a file,class_index '
                                     'CSV, or from the class folders of an ImageNet-style DIR/<wnid>/ tree). '
                                     'Replay with `ros2 bag play`.')
    bag.add_argument('images', type=Path, help='folder of images, or of ImageNet class folders (<wnid>/*.JPEG)')
    bag.add_argument('--labels', type=Path, default=None,
                     help="labels CSV (default: the folder's or its parent's labels.csv, when present)")
    bag.add_argument('-o', '--output', type=Path, required=True, help='bag to create (a directory; must not exist)')
    bag.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap', help='rosbag2 storage (default: mcap)')
    bag.add_argument('--rate', type=float, default=10.0, help='frames per second of the stamps (default: 10)')
    bag.add_argument('--compressed', action='store_true',
                     help='JPEG sensor_msgs/CompressedImage on IMAGE_TOPIC/compressed instead of raw rgb8')
    bag.add_argument('--limit', type=int, default=0, help='at most this many images (0: all)')
    bag.add_argument('--image-topic', default='/camera/image_raw', help='camera topic (default: /camera/image_raw)')
    bag.add_argument('--label-topic', default='/camera/label', help='label topic (default: /camera/label)')
    bag.set_defaults(func=_cmd_bag)

    replay = sub.add_parser('replay', help='replay a bag offline through the core, or live onto the running system',
                            description='Offline (default): every frame straight through the core library at full '
                                        'speed, no network. --live: publish the frames on the camera topic of a '
                                        'running system (sage-ros up, or ros2 launch) at the recorded rate times '
                                        '--rate, and record every OffloadResult.')
    replay.add_argument('bag', type=Path, help='bag made by sage-ros bag (or any bag with sensor_msgs/Image)')
    replay.add_argument('--live', action='store_true', help='publish onto the running system instead')
    replay.add_argument('--rate', type=float, default=1.0,
                        help='live: multiple of the recorded rate (2 = twice as fast; 0 = one frame at a time)')
    replay.add_argument('-o', '--out', type=Path, default=None, help='record the OffloadResults into this bag')
    replay.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap', help='storage of the result bag')
    replay.add_argument('--limit', type=int, default=0, help='at most this many frames (0: all)')
    replay.add_argument('--namespace', default='',
                        help="live: the robot's namespace, as given to sage-ros up (e.g. robot1): its camera and "
                             "result topics are resolved in it")
    replay.add_argument('--wait-edge', type=float, default=10.0, metavar='SECONDS',
                        help='live: how long to wait for the edge node to subscribe before giving up')
    _add_param_args(replay)
    replay.set_defaults(func=_cmd_replay)

    certs = sub.add_parser('certs', help='make a TLS deployment: CA, certificates, credentials, Zenoh configs with ACL',
                           description='Writes ca.pem, a certificate and key for the cloud and each robot, a '
                                       'credentials file, and Zenoh configs: the router (mutual TLS + access '
                                       'control: each robot may only send its own requests and read its own '
                                       'answers), the cloud node, each robot; *_usrpwd.json5 variants use '
                                       'user/password instead of client certificates.')
    certs.add_argument('--robots', type=_csv(str), required=True, help='comma-separated robot ids (= namespaces)')
    certs.add_argument('--cloud-host', action='append', required=True,
                       help='DNS name or IP the robots use to reach the cloud (repeatable)')
    certs.add_argument('--port', type=int, default=7447, help='router TLS port')
    certs.add_argument('--out', type=Path, required=True, help='output folder (keep it private)')
    certs.add_argument('--force', action='store_true', help='replace a CA already in --out (invalidates its certificates)')
    certs.set_defaults(func=_cmd_certs)

    ev = sub.add_parser('eval', help="sweep methods x budgets x eta over a bag: the paper's tables and plots",
                        description='Edge outputs are cached per frame and server answers per setting, so a '
                                    'rerun (or a run after Ctrl-C) only computes what is missing. Writes '
                                    'results.csv, results.md and PNG plots into --out. An --out folder holds one '
                                    'sweep: the same settings again resume or repeat it, other settings are '
                                    'refused (another --out can share the cache with --cache).')
    ev.add_argument('bag', type=Path, help='bag made by sage-ros bag (labels on /camera/label)')
    ev.add_argument('--methods', type=_csv(str), default=['sage', 'attention_topk', 'random', 'uniform_grid'],
                    help='comma-separated selection methods')
    ev.add_argument('--budgets', type=_csv(int), default=[32, 48, 64, 96], help='comma-separated budgets B')
    ev.add_argument('--eta', type=_csv(float), default=[1.0], help='comma-separated gate thresholds')
    ev.add_argument('--codecs', type=_csv(str), default=['jpeg'], help='comma-separated codecs (raw, png, jpeg)')
    ev.add_argument('--quality', type=int, default=None, help='JPEG quality (default: jpeg_quality of the config)')
    ev.add_argument('--prefilter-ratios', type=_csv(float), default=[2.0],
                    help='SAGE prefilter ratios k to sweep (e.g. 1,1.5,2,3,4)')
    ev.add_argument('--second-round', type=_csv(str), default=[], metavar='MODES',
                    help='two-round evidence, offline: comma-separated modes (continue, roi); SAGE at each B is '
                         'round one and, when the server\'s min-entropy on it is >= eta_cloud, the edge sends K '
                         'more patches (continue: SAGE carried on; roi: around the server\'s 8 most attended '
                         'patches, or sage_cloud roi_count), both rounds within sage_edge budget_max '
                         '(default: none, no two-round rows)')
    ev.add_argument('--second-k', type=_csv(int), default=None, metavar='K',
                    help='comma-separated patches a second round adds (default with --second-round: 16,32; '
                         '0 gives the one-round SAGE rows)')
    ev.add_argument('--eta-cloud', type=_csv(float), default=[3.0], metavar='BITS',
                    help='comma-separated server min-entropy thresholds (bits) for asking for a second round '
                         '(default 3.0; the live sage_cloud eta_cloud is not read: it is off by default)')
    ev.add_argument('--out', type=Path, required=True, help='output folder, of this sweep only')
    ev.add_argument('--cache', type=Path, default=None, help='cache file (default: OUT/cache.sqlite)')
    ev.add_argument('--limit', type=int, default=0, help='only the first N frames (0: all)')
    ev.add_argument('--no-progress', action='store_true', help='no progress bars')
    ev.add_argument('--figures', type=int, default=0, metavar='N',
                    help='PNGs of N offloaded frames with the patches of attention prefix, SAGE and BAT drawn')
    _add_param_args(ev)
    ev.set_defaults(func=_cmd_eval)
    return parser


class _WarningLines(logging.Handler):
    """The library's warnings (a params file key that matches no node, ...) as the command's own
    lines on the stderr of the moment: 'sage-ros up: warning: ...'."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        print(f'sage-ros {self.command}: warning: {record.getMessage()}', file=sys.stderr)


def _warnings_to_stderr(command: str) -> None:
    log = logging.getLogger('sage_ros')
    for old in [h for h in log.handlers if isinstance(h, _WarningLines)]:
        log.removeHandler(old)
    log.addHandler(_WarningLines(command))
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _warnings_to_stderr(args.command)
    try:
        return int(args.func(args))
    except (SageError, KeyError, TypeError, ValueError, FileNotFoundError, FileExistsError, ConnectionError) as exc:
        print(f'sage-ros {args.command}: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())
