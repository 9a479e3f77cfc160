# SPDX-License-Identifier: Apache-2.0
"""``sage-ros replay``: a bag's frames through the core offline, or onto a running system live."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from sage_ros.eval.bags import ResultBagWriter, count_frames, read_image_bag


def _result_msg(frame: Any, stamp_ns: int, seq: int, edge: dict[str, Any]) -> Any:
    """An OffloadResult for a frame the offline path decided (same fields the edge node fills)."""
    from sage_ros_msgs.msg import OffloadResult

    from sage_ros.core.labels import class_name
    from sage_ros.params import starting_budget

    msg = OffloadResult(request_id=f'replay/{seq}', sequence=seq, method=edge['method'],
                        budget_patches=starting_budget(edge), edge_label=frame.edge_label,
                        min_entropy=float(frame.score), patches_sent=int(frame.indices.size),
                        bytes_sent=int(frame.num_bytes))
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = 'camera'
    if frame.offloaded:
        msg.source, msg.label, msg.confidence = OffloadResult.SOURCE_CLOUD, frame.server_label, frame.server_conf
    else:
        msg.source, msg.label, msg.confidence = OffloadResult.SOURCE_EDGE, frame.edge_label, frame.edge_conf
    msg.label_name = class_name(msg.label)
    msg.latency_ms = frame.edge_ms + frame.server_ms
    msg.random_weights = str(edge['weights']).startswith('random')
    return msg


def replay_offline(bag: Path, edge: dict[str, Any], cloud: dict[str, Any], *, out: Path | None = None,
                   storage: str = 'mcap', limit: int = 0, emit: Callable[[str], None] = print) -> list[Any]:
    """Every frame of ``bag`` straight through the core library at full speed, no network.

    With ``out``, the per-frame OffloadResults are recorded into a result bag.
    """
    from rclpy.serialization import serialize_message

    stamps: list[int] = []
    bag_frames = read_image_bag(bag, limit=limit)  # a bag that cannot be read fails here, before the models load

    def frames():
        for f in bag_frames:
            stamps.append(f.stamp_ns)
            yield (f.source or f'frame{f.index}'), f.rgb, f.label

    writer = ResultBagWriter(out, storage=storage) if out else None
    try:
        from sage_ros.commands.demo import run_demo

        def record(frame: Any) -> None:
            if writer is not None:
                seq = len(stamps) - 1
                writer.write(stamps[-1], serialize_message(_result_msg(frame, stamps[-1], seq, edge)))

        done = run_demo(frames(), edge, cloud, emit=emit, on_frame=record)
    except BaseException:
        if writer is not None:
            writer.discard_if_empty()  # a run that failed before its first frame leaves no bag behind
        raise
    finally:
        if writer is not None:
            writer.close()
    if out:
        emit(f'wrote {len(done)} results to {out}')
    return done


def fallback_reasons(results: Iterable[Any]) -> Counter[str]:
    """How many edge fallbacks each reason (the result's ``detail``) caused."""
    from sage_ros_msgs.msg import OffloadResult

    return Counter(r.detail or 'no reason given' for r in results if r.source == OffloadResult.SOURCE_EDGE_FALLBACK)


def replay_live(bag: Path, *, rate: float = 1.0, out: Path | None = None, storage: str = 'mcap',
                image_topic: str = 'camera/image_raw', result_topic: str = 'sage/result', namespace: str = '',
                wait_s: float = 5.0, wait_edge_s: float = 10.0, limit: int = 0,
                emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Publish the bag's frames on the camera topic of a running system at the recorded rate
    times ``rate`` (0: as fast as the system answers, one frame at a time), keeping their
    recorded stamps; record every OffloadResult into ``out``. Frames and results pair by stamp.

    Relative topics resolve in ``namespace`` (the robot's). An edge node that does not subscribe
    within ``wait_edge_s`` raises :class:`~sage_ros.ros.live_client.EdgeNotFound`."""
    total = count_frames(bag)  # a bag that cannot be read fails before anything starts
    total = min(total, limit) if limit else total
    import rclpy
    from rclpy.serialization import serialize_message

    from sage_ros.ros.live_client import SOURCE_NAMES, LiveClient

    writer = ResultBagWriter(out, storage=storage) if out else None
    context = rclpy.Context()
    client = None
    try:
        rclpy.init(context=context)
        client = LiveClient(image_topic=image_topic, result_topic=result_topic, namespace=namespace,
                            context=context, name='sage_replay')
        emit(f'waiting up to {wait_edge_s:g} s for the edge node on {client.image_topic} ...')
        client.require_edge(wait_edge_s)
        emit(f'replaying {total} frames onto {client.image_topic} ({"paced" if rate > 0 else "one at a time"})')
        t_wall0, t_bag0, sent = time.monotonic(), None, []
        truth: dict[int, int | None] = {}
        for frame in read_image_bag(bag, limit=limit):
            if rate > 0:
                t_bag0 = frame.stamp_ns if t_bag0 is None else t_bag0
                due = t_wall0 + (frame.stamp_ns - t_bag0) / 1e9 / rate
                while time.monotonic() < due:
                    client.drain(min(0.01, max(0.0, due - time.monotonic())))
            stamp = client.publish(frame.rgb, stamp=frame.stamp_ns)
            sent.append(stamp)
            truth[stamp] = frame.label
            if rate <= 0:
                client.wait_result(stamp, 60.0)
        end = time.monotonic() + wait_s
        while time.monotonic() < end and not all(s in client.results for s in sent):
            client.drain(0.05)
        results = [client.results[s] for s in sent if s in client.results]
        if writer is not None:
            for r in client.all_results:
                writer.write(r.header.stamp.sec * 10**9 + r.header.stamp.nanosec, serialize_message(r))
        counts = {name: sum(r.source == code for r in results) for code, name in SOURCE_NAMES.items()}
        reasons = fallback_reasons(results)
        labelled = [(truth[s], client.results[s].label) for s in sent if s in client.results and truth[s] is not None]
        summary = {'frames': len(sent), 'results': len(results), **counts, 'fallback_reasons': dict(reasons),
                   'accuracy': float(np.mean([t == p for t, p in labelled])) if labelled else None}
        why = f': {", ".join(f"{n} {reason}" for reason, n in reasons.most_common())}' if reasons else ''
        emit(f'replay: {summary["frames"]} frames published, {summary["results"]} results '
             f'({counts["edge"]} edge, {counts["cloud"]} cloud, {counts["fallback"]} fallback{why}); frames the edge '
             f'dropped as stale have no result' + (f'; recorded to {out}' if out else ''))
        return summary
    except BaseException:
        if writer is not None:
            writer.discard_if_empty()  # e.g. no edge node: no empty bag left behind
        raise
    finally:
        if writer is not None:
            writer.close()
        if client is not None:
            client.destroy_node()
        rclpy.try_shutdown(context=context)
