# SPDX-License-Identifier: Apache-2.0
"""Counting work instead of timing it: what a call costs, the same on every machine."""

from __future__ import annotations

import sys
from typing import Callable


def python_lines(fn: Callable[[], object]) -> int:
    """Python lines executed by ``fn()`` (every frame it enters): its work, whatever the
    machine's speed or load. A loop over N things executes lines N times; C code (heapq, dict
    lookups) counts as the line that calls it."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == 'line'
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count
