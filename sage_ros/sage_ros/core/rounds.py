# SPDX-License-Identifier: Apache-2.0
"""Two-round evidence: the cloud, unsure on the first round's patches, asks for K more.

Edge side: which K patches to add (:func:`select_second_round`): SAGE's farthest-point
sampling carried on from the patches already sent (``continue``), or the neighbours of the
patches the cloud attended most (``roi``, as in arXiv 2512.16349). Cloud side: which patches
it attended most (:func:`cloud_roi`) and the round-one tokens it keeps, bounded in number and
time, until the second round comes (:class:`RoundOneStore`).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from sage_ros.core.errors import SelectionError
from sage_ros.core.selection import GRID_SIDE, _check_attention, _check_embeddings, attention_order

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

SECOND_ROUND_MODES = ('off', 'continue', 'roi')


def _check_sent(sent: ArrayLike, n: int) -> np.ndarray:
    s = np.asarray(sent, dtype=np.int64).reshape(-1)
    if s.size and (s.min() < 0 or s.max() >= n):
        raise SelectionError(f'sent patch indices must be in [0, {n})')
    if np.unique(s).size != s.size:
        raise SelectionError('sent patch indices repeat')
    return s


def continue_sage(attention: ArrayLike, embeddings: ArrayLike, sent: ArrayLike, k: int, *,
                  prefilter_ratio: float = 2.0) -> np.ndarray:
    """Up to ``k`` more patches by SAGE's farthest-point sampling, carried on from ``sent``.

    The prefilter grows with the total: candidates are the top ``ceil(prefilter_ratio *
    (len(sent) + k))`` patches by attention, less those sent. Each pick is the candidate whose
    largest cosine similarity to everything sent or picked so far is smallest (ties: higher
    attention, then lower index). So round one plus round two is what SAGE would have picked
    at the larger budget, given round one's picks.
    """
    a = _check_attention(attention)
    n = a.size
    e = _check_embeddings(embeddings, n)
    s = _check_sent(sent, n)
    if k < 0:
        raise SelectionError(f'k must be >= 0, got {k}')
    if not prefilter_ratio >= 1.0:
        raise SelectionError(f'prefilter_ratio must be >= 1, got {prefilter_ratio}')
    k = min(int(k), n - s.size)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    m = min(n, math.ceil(prefilter_ratio * (s.size + k)))
    order = attention_order(a)
    cand = order[:m][~np.isin(order[:m], s)]
    if cand.size < k:  # a prefilter that the sent patches filled: widen it by attention
        rest = order[m:][~np.isin(order[m:], s)]
        cand = np.concatenate([cand, rest[: k - cand.size]])
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = unit[cand] @ unit[s].T if s.size else np.full((cand.size, 0), -np.inf)
    max_sim = sim.max(axis=1) if s.size else np.full(cand.size, -np.inf)
    cand_sim = unit[cand] @ unit[cand].T
    picked: list[int] = []
    for _ in range(k):
        j = int(np.argmin(max_sim))
        picked.append(j)
        np.maximum(max_sim, cand_sim[j], out=max_sim)
        max_sim[j] = np.inf
    return cand[np.asarray(picked, dtype=np.int64)]


def neighbours(index: int, *, grid: int = GRID_SIDE) -> list[int]:
    """The 8-neighbourhood of a patch on the grid, row-major."""
    r, c = divmod(int(index), grid)
    return [rr * grid + cc for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
            if (rr, cc) != (r, c) and 0 <= rr < grid and 0 <= cc < grid]


def roi_neighbours(roi: ArrayLike, sent: ArrayLike, k: int, *, attention: ArrayLike | None = None,
                   grid: int = GRID_SIDE) -> np.ndarray:
    """Up to ``k`` patches around the cloud's regions of interest, none of them already sent.

    ``roi`` are the patches the cloud attended most, most attended first. Their unsent
    8-neighbours are taken region by region; within a region the edge's attention orders them
    (when given), then the index. Fewer than ``k`` come back when the regions run out.
    """
    n = grid * grid
    s = set(_check_sent(sent, n).tolist())
    r = np.asarray(roi, dtype=np.int64).reshape(-1)
    if r.size and (r.min() < 0 or r.max() >= n):
        raise SelectionError(f'roi indices must be in [0, {n})')
    if k < 0:
        raise SelectionError(f'k must be >= 0, got {k}')
    a = _check_attention(attention) if attention is not None else np.zeros(n)
    out: list[int] = []
    taken = set(s)
    for centre in r.tolist():
        ring = sorted((j for j in neighbours(centre, grid=grid) if j not in taken), key=lambda j: (-a[j], j))
        for j in ring:
            if len(out) == k:
                return np.asarray(out, dtype=np.int64)
            out.append(j)
            taken.add(j)
    return np.asarray(out, dtype=np.int64)


def select_second_round(mode: str, *, attention: ArrayLike, embeddings: ArrayLike, sent: ArrayLike, k: int,
                        roi: ArrayLike = (), prefilter_ratio: float = 2.0, grid: int = GRID_SIDE) -> np.ndarray:
    """The patches a second round adds, by ``mode`` (``continue`` or ``roi``); none for ``off``."""
    if mode == 'off':
        return np.empty(0, dtype=np.int64)
    if mode == 'continue':
        return continue_sage(attention, embeddings, sent, k, prefilter_ratio=prefilter_ratio)
    if mode == 'roi':
        return roi_neighbours(roi, sent, k, attention=attention, grid=grid)
    raise SelectionError(f'second_round must be one of {", ".join(SECOND_ROUND_MODES)}, got {mode!r}')


def cloud_roi(attention: ArrayLike, indices: ArrayLike, count: int) -> np.ndarray:
    """The grid indices of the ``count`` tokens the cloud's CLS attended most, most first.

    ``attention`` is the server's last-layer CLS attention over its tokens, in the order of
    ``indices`` (the grid positions of those tokens).
    """
    a = np.asarray(attention, dtype=np.float64).reshape(-1)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if a.size != idx.size:
        raise SelectionError(f'{a.size} attention values for {idx.size} tokens')
    return idx[np.argsort(-a, kind='stable')[: max(0, int(count))]]


@dataclass
class RoundOne:
    """What the cloud keeps of a request it asked more of: its decoded tokens, for the union."""

    robot: str
    patches: np.ndarray
    """(M, P, P, 3) uint8, decoded."""
    indices: np.ndarray
    more: int
    """Patches asked for: the second round may carry at most this many."""
    expires: float


class RoundOneStore:
    """Round-one state by request id, bounded in entries and in time. Thread-safe.

    Full, the oldest entry goes: its robot's second round is then rejected (unknown request)
    and the robot keeps the cloud's round-one answer, which it already has.
    """

    def __init__(self, max_entries: int = 64, ttl_s: float = 2.0, *, clock: Callable[[], float] | None = None
                 ) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError('max_entries must be >= 1 and ttl_s > 0')
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, RoundOne] = collections.OrderedDict()
        self.evicted = 0
        self.expired = 0

    def configure(self, *, max_entries: int | None = None, ttl_s: float | None = None) -> None:
        with self._lock:
            self.max_entries = max_entries or self.max_entries
            self.ttl_s = ttl_s or self.ttl_s
            self._trim(self._clock())

    def put(self, request_id: str, robot: str, patches: np.ndarray, indices: np.ndarray, more: int,
            ttl_s: float | None = None) -> None:
        """Keep a request's tokens for at most ``ttl_s`` (default: the store's)."""
        with self._lock:
            now = self._clock()
            self._entries.pop(request_id, None)
            self._entries[request_id] = RoundOne(robot, patches, np.asarray(indices, np.int64), int(more),
                                                 now + min(self.ttl_s, ttl_s or self.ttl_s))
            self._trim(now)

    def take(self, request_id: str, robot: str, indices: ArrayLike) -> tuple[RoundOne | None, str]:
        """Round 1 of ``request_id`` for a second round from ``robot`` adding ``indices``:
        (state, '') and the state is removed (a second round is answered once), or (None, why).

        Another robot's request is refused and left in place for its own robot.
        """
        new = np.asarray(indices, dtype=np.int64).reshape(-1)
        with self._lock:
            self._trim(self._clock())
            state = self._entries.get(request_id)
            if state is None:
                return None, 'second round of an unknown request (never asked, expired or evicted)'
            if state.robot != robot:
                return None, 'second round of another robot\'s request'
            del self._entries[request_id]
        if new.size > state.more:
            return None, f'second round of {new.size} patches, {state.more} were asked for'
        if np.isin(new, state.indices).any():
            return None, 'second round repeats patches of round 1'
        return state, ''

    def _trim(self, now: float) -> None:
        # Entries are in insertion order and expiries grow with it (up to per-entry ttl_s):
        # scan all, since a short ttl_s may follow a long one.
        for rid in [rid for rid, e in self._entries.items() if e.expires <= now]:
            del self._entries[rid]
            self.expired += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
