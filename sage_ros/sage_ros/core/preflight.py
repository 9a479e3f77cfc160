# SPDX-License-Identifier: Apache-2.0
"""Checks of settings that cannot work, made before anything slow starts (a model load, a
bring-up, an edge pass), each failing with one line that names the setting and the cause."""

from __future__ import annotations

import os
import pickle
import socket
import zipfile
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any

from sage_ros.core.errors import SageError


class UnusableSetting(SageError, ValueError):
    """A parameter or argument that cannot work here; the message names it and says why."""


def weights_file(weights: str) -> Path | None:
    """The local file ``weights`` names, or None for the sources that are not files (random,
    random:SEED, hub, hf-hub:ORG/NAME). Mirrors how the model loaders read the setting."""
    text = str(weights).strip()
    if not text or text in ('random', 'hub') or text.startswith(('random:', 'hf-hub:')):
        return None
    return Path(os.path.expanduser(text))


_HUB_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = _HUB_TIMEOUT_S) -> tuple[bool, str]:
    """(whether a TCP connection to the Hugging Face hub opens within ``timeout``, its address).
    huggingface_hub itself retries for about a minute before failing; this answers in seconds.
    HF_HUB_OFFLINE=1 (weights already in the local cache) counts as reachable."""
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
    if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes'):
        return True, endpoint
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False, endpoint
    return True, endpoint


def check_weights(what: str, weights: str) -> None:
    """Refuse weights that cannot be loaded here (``what``: 'sage_edge weights'): a file that is
    not there, or the hub when it cannot be reached."""
    text = str(weights).strip()
    if text == 'hub' or text.startswith('hf-hub:'):
        ok, endpoint = hub_reachable()
        if not ok:
            node = what.split()[0]
            raise UnusableSetting(f'{what}: {text!r} downloads from the Hugging Face hub ({endpoint}), which cannot be '
                                  f'reached from here; give a checkpoint (-p {node}.weights:=/path/model.pth), '
                                  'or --weights random for seeded random weights')
        return
    path = weights_file(weights)
    if path is not None and not path.is_file():
        raise UnusableSetting(f'{what}: checkpoint file {str(path)!r} not found (weights: a checkpoint or .onnx '
                              'file, hub, hf-hub:ORG/NAME, or random[:SEED])')
    why = checkpoint_problem(path) if path is not None else None
    if why:
        raise UnusableSetting(f'{what}: {str(path)!r} is {why} (weights: a checkpoint .pth/.pt/.bin/.safetensors or '
                              'an .onnx file, hub, hf-hub:ORG/NAME, or random[:SEED])')


def checkpoint_problem(path: Path) -> str | None:
    """Why the file ``path`` is not a checkpoint, from its first bytes, or None. The loaders'
    own errors on, say, a text file read like 'list index out of range'. An .onnx file is left
    to ONNX Runtime, which names what it cannot parse."""
    suffix = path.suffix.lower()
    if suffix == '.onnx':
        return None
    if suffix == '.safetensors':
        try:
            from safetensors import safe_open
        except ImportError:  # a robot without it cannot load one anyway: its loader says so
            return None
        try:
            with safe_open(str(path), framework='numpy'):  # reads the header only
                return None
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type
            return f'not a safetensors file ({exc})'
    try:
        with path.open('rb') as fh:
            head = fh.read(1)
    except OSError as exc:
        return f'unreadable ({exc.strerror})'
    if head == pickle.PROTO or zipfile.is_zipfile(path):
        return None
    return 'not a checkpoint: torch.save writes a zip archive (a pickle before torch 1.6), this is neither'


def check_device(what: str, device: str) -> None:
    """Refuse a torch device this machine does not have ('cuda' without a GPU, 'cuda:3' with
    two). torch is imported only for a device other than the CPU."""
    text = str(device).strip()
    if text == 'cpu':
        return
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UnusableSetting(f'{what}: {text!r} is not a torch device (cpu, cuda, cuda:N)') from None
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = 'this torch is built without CUDA' if torch.version.cuda is None else 'no CUDA GPU is visible'
            raise UnusableSetting(f'{what}: {text!r} but {why}; use device cpu')
        if dev.index is not None and dev.index >= count:
            raise UnusableSetting(f'{what}: {text!r} but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})')
    elif dev.type == 'mps' and not torch.backends.mps.is_available():
        raise UnusableSetting(f'{what}: {text!r} but Apple\'s MPS is not available here; use device cpu')


def check_models(edge: dict[str, Any], cloud: dict[str, Any]) -> None:
    """What loading both models in this process needs: their weights files and devices."""
    for node, params in (('sage_edge', edge), ('sage_cloud', cloud)):
        check_weights(f'{node} weights', params['weights'])
    for node, params in (('sage_edge', edge), ('sage_cloud', cloud)):
        check_device(f'{node} device', params['device'])
