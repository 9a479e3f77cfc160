# SPDX-License-Identifier: Apache-2.0
"""The messages sage_edge sends, built from plain values: requests, budget status, provisional
labels, the link's diagnostics, and the one line about camera frames that never arrive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from sage_ros_msgs.msg import BudgetStatus, OffloadResult, PatchSet

from sage_ros.core.labels import class_name
from sage_ros.core.link import LinkSnapshot
from sage_ros.core.models import ModelCard
from sage_ros.core.offload import OffloadPlan
from sage_ros.core.pipeline import FrameDecision


def patch_set(result: OffloadResult, decision: FrameDecision, plan: OffloadPlan, card: ModelCard,
              p: dict[str, Any], *, header: Any, robot_id: str, source_size: tuple[int, int] | None,
              sent_stamp: Time, deadline_left_s: float) -> PatchSet:
    """The request of ``result``'s frame carrying ``plan``'s patches."""
    cmap = decision.crop_map
    # The geometry in the frame the camera sent: a reduced decode keeps its aspect ratio
    # exactly, so only the source size differs (and to_source scales by it).
    source_width, source_height = source_size or (cmap.source_width, cmap.source_height)
    return PatchSet(
        header=header, request_id=result.request_id, robot_id=robot_id,
        sequence=result.sequence, sent_stamp=sent_stamp,
        source_width=source_width, source_height=source_height,
        resized_width=cmap.resized_width, resized_height=cmap.resized_height,
        crop_x=cmap.crop_x, crop_y=cmap.crop_y, input_size=cmap.input_size,
        patch_size=card.patch_size, grid_rows=card.grid[0], grid_cols=card.grid[1],
        budget_patches=result.budget_patches, budget_bytes=p['byte_budget'], method=p['method'],
        prefilter_ratio=float(p['prefilter_ratio']), indices=plan.indices.astype(np.uint16),
        encoding=plan.encoding, quality=plan.quality, payload=plan.payload,
        edge_model=card.name, edge_weights=card.weights,
        edge_topk_labels=decision.top_labels.astype(np.int32),
        edge_topk_scores=decision.top_scores.astype(np.float32),
        edge_min_entropy=result.min_entropy, eta=float(p['eta']),
        # Both rounds state the frame's deadline: the cloud answers BUSY at once, without
        # computing, a request it could not answer in time.
        deadline_left_ms=deadline_left_s * 1e3,
    )


def budget_status(p: dict[str, Any], snap: LinkSnapshot, budget: int, stamp: Time) -> BudgetStatus:
    """What the bandwidth monitor decided (``budget``: the one in force)."""
    msg = BudgetStatus(budget=budget, mode=p['budget_mode'],
                       suspended=p['budget_mode'] == 'auto' and snap.suspended,
                       throughput_bps=float(snap.throughput_bps), base_rtt_ms=snap.base_rtt_s * 1e3,
                       bytes_per_patch=float(snap.bytes_per_patch), deadline_ms=float(p['deadline_ms']),
                       budget_min=snap.budget_min, budget_max=snap.budget_max, answered=snap.answered,
                       deadline_misses=snap.deadline_misses, probes=snap.probes)
    msg.header.stamp = stamp
    return msg


def provisional(result: OffloadResult) -> OffloadResult:
    """The edge label of an offloaded frame while the cloud works, for consumers that act on
    every frame at once (a controller at camera rate); sage/result keeps one final result."""
    return OffloadResult(header=result.header, request_id=result.request_id, sequence=result.sequence,
                         source=OffloadResult.SOURCE_EDGE, label=result.edge_label,
                         label_name=class_name(result.edge_label), confidence=result.confidence,
                         min_entropy=result.min_entropy, edge_label=result.edge_label,
                         patches_sent=result.patches_sent, bytes_sent=result.bytes_sent,
                         budget_patches=result.budget_patches, method=result.method, detail='provisional',
                         random_weights=result.random_weights)


def lost_frames_line(lost: int, frame_bytes: int, topic: str, fastdds_profile: Path) -> str:
    """Why a publisher's frames usually go missing, and what to do (said once)."""
    return (f'{lost} camera frame(s) from a publisher on {topic} never arrived (this one is '
            f'{frame_bytes / 1e6:.1f} MB; "lost" on /diagnostics counts them). Frames over 512 kB need '
            f'Fast DDS\'s larger shared-memory segment in the camera\'s process too: export '
            f'FASTDDS_DEFAULT_PROFILES_FILE={fastdds_profile} before starting the camera driver. Frames over 32 MB '
            f'do not fit even then. Or subscribe to the compressed topic instead '
            f'(launch argument camera_transport:=compressed, or compressed_image_topic). Warned once.')


def link_status(p: dict[str, Any], snap: LinkSnapshot, budget: int, uplink_state: str, problem: str, *,
                new_misses: bool, name: str, hardware_id: str) -> DiagnosticStatus:
    """The link's /diagnostics status: the worst thing wrong with it, and the monitor's figures.
    ``problem`` is the line the uplink logged when it stays useless (the cause, what to check)."""
    auto = p['budget_mode'] == 'auto'
    if uplink_state == 'unanswered':  # "connected", yet nothing ever answered
        level, text = DiagnosticStatus.ERROR, problem or 'requests unanswered'
    elif auto and snap.suspended:
        level, text = DiagnosticStatus.ERROR, 'offloading suspended: even budget_min misses the deadline'
    elif not snap.connected:
        level, text = DiagnosticStatus.WARN, f'no uplink: {uplink_state}; frames keep edge labels'
    elif new_misses:
        level, text = DiagnosticStatus.WARN, 'deadline misses'
    elif auto and snap.budget <= snap.budget_min:
        level, text = DiagnosticStatus.WARN, 'budget at its minimum'
    else:
        level, text = DiagnosticStatus.OK, 'ok'
    values = {'uplink': uplink_state, 'problem': problem, 'budget': budget, 'mode': p['budget_mode'],
              'in_flight': snap.in_flight, 'max_in_flight': snap.max_in_flight,
              'queued_bytes': f'{snap.queued_bytes:.0f}',
              'throughput_kbit_s': f'{snap.throughput_bps * 8 / 1e3:.1f}',
              'base_rtt_ms': f'{snap.base_rtt_s * 1e3:.1f}', 'edge_ms': f'{snap.edge_s * 1e3:.1f}',
              'bytes_per_patch': f'{snap.bytes_per_patch:.0f}', 'answered': snap.answered,
              'deadline_misses': snap.deadline_misses, 'probes': snap.probes, 'suspended': snap.suspended,
              'second_rounds': snap.second_rounds}
    return DiagnosticStatus(level=level, name=name, message=text, hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
