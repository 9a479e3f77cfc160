# SPDX-License-Identifier: Apache-2.0
"""A resumable cache of model outputs for sweeps: edge outputs per frame, server answers per
(setting, frame), and the patches a second round added. SQLite, committed as it goes, so an
interrupted sweep resumes where it was."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS edge (
    ctx TEXT, idx INTEGER, stamp INTEGER, truth INTEGER, label INTEGER, confidence REAL,
    min_entropy REAL, entropy REAL, margin REAL, attention BLOB, embeddings BLOB, emb_dim INTEGER,
    PRIMARY KEY (ctx, idx));
CREATE TABLE IF NOT EXISTS server (
    ctx TEXT, setting TEXT, idx INTEGER, label INTEGER, confidence REAL, patches INTEGER,
    bytes INTEGER, coverage REAL, truncated INTEGER, PRIMARY KEY (ctx, setting, idx));
CREATE TABLE IF NOT EXISTS round_two (
    ctx TEXT, setting TEXT, idx INTEGER, indices BLOB, PRIMARY KEY (ctx, setting, idx));
"""


def context_key(**parts: Any) -> str:
    """Stable short id of everything a cached output depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EdgeRecord:
    """What the sweep needs of one frame's edge pass."""

    idx: int
    stamp: int
    truth: int | None
    label: int
    confidence: float
    min_entropy: float
    entropy: float
    margin: float
    attention: np.ndarray
    embeddings: np.ndarray


@dataclass(frozen=True)
class ServerRecord:
    idx: int
    label: int
    confidence: float
    patches: int
    bytes: int
    coverage: float
    truncated: int


class EvalCache:
    """Open (or create) the cache file; use as a context manager."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path))
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.commit()
        self._db.close()

    def __enter__(self) -> EvalCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- edge -----------------------------------------------------------------------------
    def edge_indices(self, ctx: str) -> set[int]:
        return {r[0] for r in self._db.execute('SELECT idx FROM edge WHERE ctx = ?', (ctx,))}

    def put_edge(self, ctx: str, recs: Iterable[EdgeRecord]) -> None:
        self._db.executemany(
            'INSERT OR REPLACE INTO edge VALUES (?,?,?,?,?,?,?,?,?,?,?,?)',
            [(ctx, r.idx, r.stamp, -1 if r.truth is None else r.truth, r.label, r.confidence, r.min_entropy,
              r.entropy, r.margin, r.attention.astype(np.float32).tobytes(),
              # float16 halves the cache; cosine similarities move by ~1e-3, far below SAGE's margins.
              r.embeddings.astype(np.float16).tobytes(), r.embeddings.shape[1]) for r in recs])
        self._db.commit()

    def edge(self, ctx: str) -> list[EdgeRecord]:
        rows = self._db.execute('SELECT idx, stamp, truth, label, confidence, min_entropy, entropy, margin, '
                                'attention, embeddings, emb_dim FROM edge WHERE ctx = ? ORDER BY idx', (ctx,))
        out = []
        for idx, stamp, truth, label, conf, me, ent, mar, att, emb, dim in rows:
            out.append(EdgeRecord(idx, stamp, None if truth < 0 else truth, label, conf, me, ent, mar,
                                  np.frombuffer(att, np.float32).copy(),
                                  np.frombuffer(emb, np.float16).reshape(-1, dim).astype(np.float32)))
        return out

    # --- server ---------------------------------------------------------------------------
    def server_done(self, ctx: str, setting: str) -> set[int]:
        return {r[0] for r in self._db.execute('SELECT idx FROM server WHERE ctx = ? AND setting = ?', (ctx, setting))}

    def put_server(self, ctx: str, setting: str, recs: Iterable[ServerRecord]) -> None:
        self._db.executemany('INSERT OR REPLACE INTO server VALUES (?,?,?,?,?,?,?,?,?)',
                             [(ctx, setting, r.idx, r.label, r.confidence, r.patches, r.bytes, r.coverage,
                               r.truncated) for r in recs])

    def commit(self) -> None:
        self._db.commit()

    def server_contexts(self) -> list[str]:
        """Contexts (models, weights, selection parameters) with server answers cached."""
        return [r[0] for r in self._db.execute('SELECT DISTINCT ctx FROM server')]

    def server(self, ctx: str, setting: str) -> dict[int, ServerRecord]:
        rows = self._db.execute('SELECT idx, label, confidence, patches, bytes, coverage, truncated FROM server '
                                'WHERE ctx = ? AND setting = ?', (ctx, setting))
        return {r[0]: ServerRecord(*r) for r in rows}

    # --- second rounds --------------------------------------------------------------------
    def put_round_two(self, ctx: str, setting: str, idx: int, indices: np.ndarray) -> None:
        """The grid indices a frame's second round added (committed with its server answer)."""
        self._db.execute('INSERT OR REPLACE INTO round_two VALUES (?,?,?,?)',
                         (ctx, setting, idx, np.asarray(indices, np.int16).tobytes()))

    def round_two(self, ctx: str, setting: str) -> dict[int, np.ndarray]:
        rows = self._db.execute('SELECT idx, indices FROM round_two WHERE ctx = ? AND setting = ?', (ctx, setting))
        return {idx: np.frombuffer(blob, np.int16).astype(np.int64) for idx, blob in rows}
