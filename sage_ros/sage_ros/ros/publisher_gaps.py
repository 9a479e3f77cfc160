# SPDX-License-Identifier: Apache-2.0
"""Messages a publisher sent that never reached a subscription, from rclpy's message info
(each publisher numbers what it publishes)."""

from __future__ import annotations

from typing import Any


class PublisherGaps:
    """Counts the gaps in each publisher's sequence numbers, one subscription's view.

    Not thread-safe: one subscription callback feeds it (an executor runs them one at a time).
    """

    def __init__(self) -> None:
        self._last: dict[bytes, int] = {}

    def missed(self, info: Any) -> int:
        """Messages of this message's publisher that never arrived since its previous one
        (0 when ``info`` carries no sequence number: rmw implementations differ)."""
        seq = info.get('publication_sequence_number') if isinstance(info, dict) else None
        gid = (info.get('publisher_gid') or {}).get('data') if isinstance(info, dict) else None
        if seq is None or gid is None:
            return 0
        key = bytes(gid)
        last = self._last.get(key)
        self._last[key] = seq
        return seq - last - 1 if last is not None and seq > last + 1 else 0
