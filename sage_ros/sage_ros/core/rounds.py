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
import heapq
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
    """Round-one state by robot and request id, bounded in entries and in time. Thread-safe.

    Keyed by its owner: a request of another robot, even under the same id, neither finds nor
    replaces it. Full, the robot holding the most entries loses its oldest (a robot asking
    many cannot push out another's one): that robot's second round is then rejected (unknown
    request) and it keeps the cloud's round-one answer, which it already has.
    """

    def __init__(self, max_entries: int = 64, ttl_s: float = 2.0, *, clock: Callable[[], float] | None = None
                 ) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError('max_entries must be >= 1 and ttl_s > 0')
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], RoundOne] = {}
        # Each robot's request ids, oldest first: which entry goes when the store is full.
        self._by_robot: dict[str, collections.OrderedDict[str, None]] = {}
        # (expires, put number, key): the next to expire first (stale once replaced or taken).
        self._expiry: list[tuple[float, int, tuple[str, str]]] = []
        self._puts = 0
        self.evicted = 0
        self.expired = 0

    def configure(self, *, max_entries: int | None = None, ttl_s: float | None = None) -> None:
        with self._lock:
            self.max_entries = max_entries or self.max_entries
            self.ttl_s = ttl_s or self.ttl_s
            self._trim(self._clock())

    def put(self, request_id: str, robot: str, patches: np.ndarray, indices: np.ndarray, more: int,
            ttl_s: float | None = None) -> None:
        """Keep ``robot``'s tokens of ``request_id`` for at most ``ttl_s`` (default: the store's)."""
        with self._lock:
            now = self._clock()
            key = (robot, request_id)
            self._remove(key)
            expires = now + min(self.ttl_s, ttl_s or self.ttl_s)
            self._entries[key] = RoundOne(robot, patches, np.asarray(indices, np.int64), int(more), expires)
            self._by_robot.setdefault(robot, collections.OrderedDict())[request_id] = None
            self._puts += 1
            heapq.heappush(self._expiry, (expires, self._puts, key))
            self._trim(now)

    def take(self, request_id: str, robot: str, indices: ArrayLike) -> tuple[RoundOne | None, str]:
        """Round 1 of ``robot``'s ``request_id`` for a second round adding ``indices``: (state,
        '') and the state is removed (a second round is answered once), or (None, why)."""
        new = np.asarray(indices, dtype=np.int64).reshape(-1)
        with self._lock:
            self._trim(self._clock())
            state = self._remove((robot, request_id))
            if state is None:
                return None, 'second round of an unknown request (never asked, expired or evicted)'
        if new.size > state.more:
            return None, f'second round of {new.size} patches, {state.more} were asked for'
        if np.isin(new, state.indices).any():
            return None, 'second round repeats patches of round 1'
        return state, ''

    def kept_tokens(self, request_id: str, robot: str) -> int:
        """Tokens kept for ``robot``'s ``request_id`` (0 if none): what its round 2 adds to."""
        with self._lock:
            state = self._entries.get((robot, request_id))
            return 0 if state is None else int(state.indices.size)

    def _remove(self, key: tuple[str, str]) -> RoundOne | None:
        state = self._entries.pop(key, None)
        if state is not None:
            mine = self._by_robot[key[0]]
            del mine[key[1]]
            if not mine:
                del self._by_robot[key[0]]
        return state

    def _trim(self, now: float) -> None:
        while self._expiry:
            expires, _, key = self._expiry[0]
            state = self._entries.get(key)
            live = state is not None and state.expires == expires
            if live and expires > now:
                break
            heapq.heappop(self._expiry)
            if live:
                self._remove(key)
                self.expired += 1
        if len(self._expiry) > 2 * len(self._entries) + 64:  # taken or replaced ones pile up: rebuild
            self._expiry = [e for e in self._expiry if (s := self._entries.get(e[2])) is not None and
                            s.expires == e[0]]
            heapq.heapify(self._expiry)
        while len(self._entries) > self.max_entries:
            # Rare (the store is full): the robot holding the most gives up its oldest.
            robot = max(self._by_robot, key=lambda r: len(self._by_robot[r]))
            self._remove((robot, next(iter(self._by_robot[robot]))))
            self.evicted += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
