#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Proof that the robot edge runs on aarch64 and decides as x86 does (issue 18, item 5).

    ./dev scripts/aarch64_edge_check.py [--frames 4] [--root build/aarch64-root]

1. An arm64 Debian 12 (bookworm) root, built once and kept under build/ (git-ignored):
   ``debootstrap --foreign --variant=minbase --include=python3`` from the mirror apt uses here,
   every downloaded .deb unpacked with ``dpkg-deb -x``. binfmt_misc is not mounted on these
   machines, so nothing in the root is run by debootstrap's second stage; the root's
   interpreter runs as ``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11``. QEMU emulates
   the Pi 5's core (``-cpu cortex-a76``), and ROOT/proc/cpuinfo is a Pi 5's: ``-L`` sends the
   guest's read there, and onnxruntime segfaults at import on the host's x86 /proc/cpuinfo.
   Missing qemu-user-static or debootstrap are installed with apt-get.
2. The aarch64 wheels of requirements-robot.txt, installed from here with pip's ``--platform``
   into ROOT/opt/robot-site, for Python 3.11: the root's interpreter is Debian 12's (a Pi 5 on
   Ubuntu 24.04 has 3.12, which sage_ros/test/test_robot_requirements.py resolves). Tags up to
   the root's glibc only. Checked: exactly the pins, no torch or CUDA wheel.
3. The edge exported with ``sage-ros export-edge`` (random weights), a few real images from
   $SAGE_ROS_DATA sent as camera JPEGs, and ``python -m sage_ros.bench.cross_arch run`` over them with
   ONNX Runtime here (x86, this venv) and in the root (aarch64, the robot's pins, sage_ros from
   source, no torch).
4. :func:`sage_ros.bench.cross_arch.compare`: gate decisions and SAGE patches equal, outputs within
   FP32_TOLERANCE; payload bytes reported. Exit 1 on a mismatch, 2 when it could not run.

Run time here (2 cores, shared): 123 s the first time (apt-get, root and wheels: 49 s), 89 s
after (4 frames; one forward 8-15 s under emulation). Not in the test suite for that reason;
sage_ros/test/test_cross_arch.py checks the comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'sage_ros' / 'test'))  # the robot requirements' pins and platform tags

from test_robot_requirements import FORBIDDEN, PLATFORMS, REQUIREMENTS, _canonical, _pins  # noqa: E402

from sage_ros.bench.cross_arch import compare, format_summary, write_camera_frames  # noqa: E402
from sage_ros.commands.images import list_images  # noqa: E402

SUITE = 'bookworm'  # Debian 12: python3 is 3.11
PYTHON = '3.11'
QEMU = 'qemu-aarch64-static'
# The Raspberry Pi 5's core. Not QEMU's default (max): its 512-bit SVE makes numpy 1.26.4's bundled
# OpenBLAS (0.3.23) compute float32 matmuls wrong (a unit vector's cosine with itself came out
# 0.006), so SAGE picked other patches while ONNX Runtime's outputs still matched; correct with SVE
# off or at 128 or 256 bits. A Pi 5 has no SVE; `--cpu max` shows the failure.
QEMU_CPU = 'cortex-a76'
READY = '.sage_ros-root-ready'
SITE = Path('opt/robot-site')
# /proc/cpuinfo of a Raspberry Pi 5 (BCM2712: 4 x Cortex-A76 r4p1), what the robot's onnxruntime reads.
PI5_CPU = ('BogoMIPS\t: 108.00\n'
           'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc '
           'dcpop asimddp\n'
           'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n')
PI5_CPUINFO = (''.join(f'processor\t: {i}\n{PI5_CPU}\n' for i in range(4))
               + 'Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n')


class CheckError(Exception):
    """The check could not run; the message says why."""


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise CheckError(f'{what} failed (exit {done.returncode}): {" ".join(cmd[:6])} ...\n' + '\n'.join(tail))
    return done


def ensure_tools() -> None:
    if shutil.which(QEMU) and shutil.which('debootstrap'):
        return
    print('installing qemu-user-static and debootstrap (apt-get) ...', flush=True)
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    _run(['apt-get', 'update'], 'apt-get update', env=env)
    _run(['apt-get', 'install', '-y', '--no-install-recommends', 'qemu-user-static', 'debootstrap'],
         'apt-get install', env=env)


def debian_mirror() -> str:
    """The Debian mirror apt's sources name for SUITE (deb822 or one-line, as apt reads them)."""
    done = _run(['apt-get', 'indextargets', '--no-release-info', '--format', '$(SITE) $(RELEASE)',
                 'Created-By: Packages'], 'apt-get indextargets')
    for line in done.stdout.splitlines():
        site, _, release = line.partition(' ')
        if release == SUITE:
            return site
    raise CheckError(f'no apt source for Debian {SUITE} in /etc/apt/sources.list*; give one with --mirror')


def build_root(root: Path, mirror: str) -> None:
    """The arm64 Debian root with python3, unpacked without running anything in it."""
    partial = root.with_name(root.name + '.partial')
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    print(f'building the arm64 Debian {SUITE} root from {mirror} (once; a few minutes) ...', flush=True)
    _run(['debootstrap', '--foreign', '--variant=minbase', '--include=python3', '--arch=arm64', SUITE,
          str(partial), mirror], 'debootstrap')
    debs = sorted((partial / 'var/cache/apt/archives').glob('*.deb'))
    if not debs:
        raise CheckError(f'debootstrap left no .deb files in {partial}/var/cache/apt/archives')
    for deb in debs:
        _run(['dpkg-deb', '-x', str(deb), str(partial)], f'unpacking {deb.name}')
    (partial / READY).write_text(f'debian {SUITE} arm64 minbase + python3\n')
    partial.rename(root)  # complete or absent: a root without READY is nobody's


def root_glibc_minor(root: Path) -> int:
    """glibc's minor version in the root (from its libc6 package), for the manylinux tags it runs."""
    debs = sorted((root / 'var/cache/apt/archives').glob('libc6_*_arm64.deb'))
    if not debs:
        raise CheckError(f'no libc6 package in {root}; remove the root to rebuild it')
    version = _run(['dpkg-deb', '-f', str(debs[0]), 'Version'], 'reading libc6 version').stdout.strip()
    match = re.match(r'2\.(\d+)', version)
    if not match:
        raise CheckError(f'cannot read glibc version {version!r}')
    return int(match.group(1))


def platform_tags(glibc_minor: int) -> list[str]:
    """The robot requirements' aarch64 tags that a glibc 2.``glibc_minor`` runs."""
    def minor(tag: str) -> int:
        return 17 if tag.startswith('manylinux2014') else int(tag.split('_')[2])

    return [tag for tag in PLATFORMS if minor(tag) <= glibc_minor]


def install_wheels(root: Path) -> Path:
    """requirements-robot.txt's aarch64 wheels in ROOT/opt/robot-site (again only when it changed)."""
    site = root / SITE
    tags = platform_tags(root_glibc_minor(root))
    stamp = hashlib.sha256((REQUIREMENTS.read_text() + ' '.join(tags) + PYTHON).encode()).hexdigest()
    stamp_file = site / '.requirements.sha256'
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return site
    shutil.rmtree(site, ignore_errors=True)
    print(f'installing the aarch64 wheels of {REQUIREMENTS.name} (Python {PYTHON}) ...', flush=True)
    _run([sys.executable, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check', '--target', str(site),
          *(arg for tag in tags for arg in ('--platform', tag)), '--python-version', PYTHON, '--implementation', 'cp',
          '--only-binary=:all:', '-r', str(REQUIREMENTS)], 'pip install (aarch64)', timeout=900)
    installed = {_canonical(d.metadata['Name']): d.version for d in importlib.metadata.distributions(path=[str(site)])}
    wrong = {name: (installed.get(name), version) for name, version in _pins().items()
             if installed.get(name) != version}
    if wrong:
        raise CheckError(f'{site} does not hold the pins (installed, pinned): {wrong}')
    heavy = sorted(name for name in installed if FORBIDDEN.match(name))
    if heavy:
        raise CheckError(f'requirements-robot.txt brought {heavy} into the robot site')
    stamp_file.write_text(stamp)
    return site


def prepare_root(root: Path, mirror: str) -> None:
    ensure_tools()
    if not (root / READY).is_file():
        if root.exists():
            raise CheckError(f'{root} exists but is no root this script built; remove it or give another --root')
        build_root(root, mirror or debian_mirror())
    # Written on every run, so the root always reads the cpuinfo this script names.
    (root / 'proc').mkdir(exist_ok=True)
    (root / 'proc' / 'cpuinfo').write_text(PI5_CPUINFO)


def guest_command(root: Path, *args: str, cpu: str = QEMU_CPU) -> list[str]:
    return [QEMU, '-L', str(root), '-cpu', cpu, str(root / 'usr/bin' / f'python{PYTHON}'), *args]


def guest_env(root: Path) -> dict[str, str]:
    # Only what the guest needs: nothing of this venv (PYTHONHOME, LD_LIBRARY_PATH) may reach it.
    return {'PATH': '/usr/bin:/bin', 'HOME': os.environ.get('HOME', '/root'), 'LANG': 'C.UTF-8',
            'PYTHONNOUSERSITE': '1', 'PYTHONDONTWRITEBYTECODE': '1',
            'PYTHONPATH': f'{REPO / "sage_ros"}:{root / SITE}'}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--frames', type=int, default=4,
                        help='real frames to compare (default: 4; one forward takes 8-15 s under emulation here)')
    parser.add_argument('--root', type=Path, default=REPO / 'build' / 'aarch64-root',
                        help='the cached arm64 root (default: build/aarch64-root)')
    parser.add_argument('--work', type=Path, default=REPO / 'build' / 'aarch64-check',
                        help='where the model, frames and both records are written (default: build/aarch64-check)')
    parser.add_argument('--images', type=Path,
                        default=Path(os.environ.get('SAGE_ROS_DATA', REPO.parent / 'shared/data/imagenet-val-1300')),
                        help='the real image set (default: $SAGE_ROS_DATA)')
    parser.add_argument('--cpu', default=QEMU_CPU,
                        help=f'the core QEMU emulates (default: {QEMU_CPU}, the Pi 5\'s; see `{QEMU} -cpu help`)')
    parser.add_argument('--mirror', default='', help='Debian mirror for debootstrap (default: the one apt uses)')
    args = parser.parse_args(argv)
    if not 1 <= args.frames <= 50:
        parser.error('--frames must be 1..50')
    start = time.perf_counter()
    root, work = args.root.resolve(), args.work.resolve()
    try:
        images = list_images(args.images / 'images') if (args.images / 'images').is_dir() else []
        if len(images) < args.frames:
            raise CheckError(f'{args.images}/images holds {len(images)} images, {args.frames} needed; '
                             'set SAGE_ROS_DATA or --images')
        t = time.perf_counter()
        prepare_root(root, args.mirror)
        site = install_wheels(root)
        probe = _run(guest_command(root, '-c', 'import platform, onnxruntime; print(platform.machine(), '
                                                'platform.python_version(), onnxruntime.__version__)', cpu=args.cpu),
                     'onnxruntime in the aarch64 root', env=guest_env(root), timeout=600).stdout.split()
        if len(probe) != 3 or probe[0] != 'aarch64':
            raise CheckError(f'the root does not run as aarch64: {probe}')
        print(f'aarch64 root ready: {root} (Python {probe[1]}, onnxruntime {probe[2]} from {site}; '
              f'QEMU -cpu {args.cpu}), {time.perf_counter() - t:.0f} s', flush=True)

        work.mkdir(parents=True, exist_ok=True)
        model = work / 'edge.onnx'
        t = time.perf_counter()
        _run([sys.executable, '-m', 'sage_ros.cli', 'export-edge', '--weights', 'random:0', '-o', str(model)],
             'sage-ros export-edge', timeout=600)
        step = max(1, len(images) // args.frames)
        frames = write_camera_frames([it.path for it in images[::step][:args.frames]], work / 'frames')
        print(f'exported {model.name}, camera frames: {len(frames)}, in {time.perf_counter() - t:.0f} s', flush=True)

        records = {}
        host = platform.machine()
        runs = ((host, [sys.executable], None), ('aarch64', guest_command(root, cpu=args.cpu), guest_env(root)))
        for arch, cmd, env in runs:
            t = time.perf_counter()
            out = work / f'{arch}.json'
            out.unlink(missing_ok=True)
            _run([*cmd, '-m', 'sage_ros.bench.cross_arch', 'run', str(model), *map(str, frames), '-o', str(out)],
                 f'the edge on {arch}', env=env, timeout=3600, cwd=work)
            records[arch] = out
            print(f'edge on {arch}: {time.perf_counter() - t:.0f} s', flush=True)
    except (CheckError, subprocess.TimeoutExpired, OSError) as exc:
        print(f'aarch64 check could not run: {exc}', file=sys.stderr)
        print(f'run time: {time.perf_counter() - start:.0f} s', file=sys.stderr)
        return 2
    reference, other = (json.loads(records[a].read_text()) for a in (host, 'aarch64'))
    result = compare(reference, other)
    print(format_summary(result, reference, other))
    print(f'run time: {time.perf_counter() - start:.0f} s')
    return 1 if result['mismatches'] else 0


if __name__ == '__main__':
    sys.exit(main())
