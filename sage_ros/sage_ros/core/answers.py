# SPDX-License-Identifier: Apache-2.0
"""Which one final result an offloaded frame gets, and when a second round is sent.

A frame the gate offloads gets exactly one final result: the cloud's answer (round 1, or the
union's after a second round), round 1's answer when the cloud asked for more and the second
round does not come through, or the edge's label (no uplink, window full, timeout, BUSY,
REJECTED, a failed send, shutdown). :class:`AnswerBook` decides it from plain inputs: the
request's link bookkeeping is the :class:`~sage_ros.core.link.UplinkMonitor`'s, the patches are
the :class:`~sage_ros.core.pipeline.EdgePipeline`'s, and what a node does with a decision
(fill and publish a message, serialise and send a request) is the node's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from sage_ros.core.errors import SageError
from sage_ros.core.link import UplinkMonitor
from sage_ros.core.offload import Budget, OffloadPlan, SelectionConfig
from sage_ros.core.pipeline import EdgePipeline, FrameDecision


class Status(IntEnum):
    """CloudResult's status values (sage_ros_msgs/msg/CloudResult.msg; a test holds them equal)."""

    OK = 0
    REJECTED = 1
    BUSY = 2
    ERROR = 3
    PROBE = 4
    MORE = 5


@dataclass(frozen=True)
class OffloadSettings:
    """The sage_edge parameters that decide offloads and second rounds."""

    deadline_s: float
    second_round: str
    """continue, roi or off (core.rounds.SECOND_ROUND_MODES)."""
    budget_max: int
    """Patches both rounds of a frame may carry together."""
    selection: SelectionConfig
    byte_budget: int = 0


@dataclass
class Offloaded:
    """A frame whose request is out: what its final result needs (the link monitor keeps it)."""

    request_id: str
    arrival: float
    """Edge monotonic clock at the frame's arrival: its deadline counts from here."""
    decision: FrameDecision | None
    """The edge's view of the frame, for picking a second round's patches."""
    sent: np.ndarray
    """Patch indices of round 1."""
    owner: Any = None
    """The node's own record of the frame (its result message, header)."""
    first: Any = None
    """The cloud's round-1 answer once it asked for more: the final answer if round 2 fails."""


@dataclass(frozen=True)
class Final:
    """A frame's one final result."""

    job: Offloaded
    answer: Any | None
    """The cloud answer whose label the frame gets; None: the edge's label (a fallback)."""
    detail: str
    """Why, for the result (empty for a plain cloud answer)."""


@dataclass(frozen=True)
class Refused:
    """An offload that is not sent: the frame keeps its edge label now."""

    reason: str
    cause: str = ''
    """A counter name (no_uplink, window_full, suspended, uplink_busy), or '' for none."""
    budget: int = 0
    truncated: int = 0


@dataclass(frozen=True)
class Request:
    """A request to send: round 1 of ``job``, or its second round (``round`` 2)."""

    job: Offloaded
    plan: OffloadPlan
    budget: int
    """Patches the request stands for (round 2: both rounds')."""
    round: int = 1
    second_round_max: int = 0
    """Round 1: the most patches a second round could add within the deadline."""
    second_round_s: float = 0.0

    @property
    def tokens(self) -> int:
        """Patch tokens the cloud classifies for it (round 2: the union)."""
        return int(self.plan.indices.size) + (int(self.job.sent.size) if self.round == 2 else 0)


def answer_times(received_s: float, started_s: float, sent_s: float) -> tuple[float, float]:
    """(server seconds, compute seconds) of an answer from the cloud's own stamps (0: unstated)."""
    return max(0.0, sent_s - received_s), (max(0.0, sent_s - started_s) if started_s > 0 else 0.0)


class AnswerBook:
    """Decides each offloaded frame's final result, and its second round.

    Thread-safe as far as the monitor is: every per-request state change goes through it, and a
    request leaves it (answered, expired, cancelled, drained) exactly once.
    """

    def __init__(self, monitor: UplinkMonitor, settings: OffloadSettings) -> None:
        self._monitor = monitor
        self.settings = settings
        """Swapped in whole when parameters change: each decision reads one consistent set."""

    # --- round 1 ---------------------------------------------------------------------------
    def offload(self, request_id: str, decision: FrameDecision, *, arrival: float, fixed_budget: int,
                owner: Any = None) -> Request | Refused:
        """Round 1 of a frame the gate offloads: its patches within the budget the link admits
        now (``fixed_budget`` > 0: the user's B), or why it stays on the edge."""
        s = self.settings
        admission = self._monitor.admit(arrival=arrival, fixed_budget=fixed_budget)
        if not admission.budget:
            return Refused(admission.reason, admission.cause)
        try:
            plan = EdgePipeline.plan(decision, Budget(admission.budget, s.byte_budget), s.selection)
        except SageError as exc:
            return Refused(f'selection failed: {exc}', budget=admission.budget)
        if plan.indices.size == 0:  # a threshold method found no patch worth sending
            return Refused(f'{s.selection.method} selected no patch', budget=admission.budget,
                           truncated=plan.truncated_by_method)
        job = Offloaded(request_id, arrival, decision, plan.indices, owner)
        more, took_s = 0, 0.0
        if s.second_round != 'off':
            # What a second round could add and still meet this frame's deadline: the cloud
            # asks only within it.
            more, took_s = self._monitor.second_round_offer(arrival=arrival, patches=int(plan.indices.size),
                                                            total_max=s.budget_max)
        return Request(job, plan, admission.budget, 1, more, took_s)

    def sending(self, request: Request, request_bytes: int) -> None:
        """``request`` leaves now (before the send: its answer may come back at once)."""
        job = request.job
        self._monitor.sent(job.request_id, request_bytes=request_bytes, patches=int(request.plan.indices.size),
                           payload_bytes=request.plan.num_bytes, deadline=self.deadline(job), context=job,
                           tokens=request.tokens if request.round == 2 else 0)

    def send_failed(self, request: Request, exc: BaseException) -> Final | None:
        """The send raised: the frame's final result, unless an answer or its deadline already
        gave it one."""
        if self._monitor.cancel(request.job.request_id) is None:
            return None
        return self.failed(request.job, f'send failed: {exc}')

    def deadline(self, job: Offloaded) -> float:
        return job.arrival + self.settings.deadline_s

    # --- answers ---------------------------------------------------------------------------
    def answered(self, answer: Any, server_s: float, compute_s: float) -> Final | Request | None:
        """A cloud answer (a CloudResult: status, labels, detail, more_patches, roi_indices):
        the frame's final result, its second round to send, or None when no frame waits for it
        (late, a probe's, or never ours; it still measures the link)."""
        status = int(answer.status)
        # Any answer frees its window slot at once: a BUSY one (shed, or too late for its
        # deadline, never computed) measures the link but not the server.
        request = self._monitor.answered(str(answer.request_id), server_s, compute_s,
                                         computed=status in (Status.OK, Status.MORE))
        if request is None:
            return None
        job: Offloaded = request.context
        if status == Status.MORE and len(answer.labels) and job.first is None:
            job.first = answer
            second = self._second_round(job, answer)
            return second if isinstance(second, Request) else Final(job, answer, f'no second round: {second}')
        if status != Status.OK or not len(answer.labels):
            name = {Status.BUSY: 'busy', Status.REJECTED: 'rejected'}.get(status, 'error')
            return self.failed(job, f'cloud {name}: {answer.detail}'.rstrip(': '))
        return Final(job, answer, '')

    def failed(self, job: Offloaded, why: str) -> Final:
        """No usable answer came: round 1's cloud answer if the cloud gave one, else the edge's."""
        if job.first is not None:
            return Final(job, job.first, f'second round failed ({why}): round-1 answer')
        return Final(job, None, why)

    def expired(self) -> list[Final]:
        """Frames whose deadline passed without an answer, each once."""
        return [self.failed(r.context, 'timeout') for r in self._monitor.expire()]

    def drain(self, why: str) -> list[Final]:
        """Every frame still waiting (shutdown)."""
        return [self.failed(r.context, why) for r in self._monitor.drain()]

    def _second_round(self, job: Offloaded, ask: Any) -> Request | str:
        """The patches the cloud asked for, or why none are sent."""
        s = self.settings
        if s.second_round == 'off':
            return 'second_round is off'
        if not self._monitor.connected:
            return 'no uplink'
        k = min(int(ask.more_patches), s.budget_max - int(job.sent.size))
        if k <= 0:
            return 'budget_max reached'
        try:
            plan = EdgePipeline.plan_second_round(job.decision, job.sent, s.second_round, Budget(k, s.byte_budget),
                                                  s.selection, roi=np.asarray(ask.roi_indices, np.int64))
        except SageError as exc:
            return f'selection failed: {exc}'
        if plan.indices.size == 0:
            return 'no patch left to add'
        tokens = int(job.sent.size + plan.indices.size)
        # Asked for now, so planned now: behind whatever we have sent since round 1.
        if not self._monitor.second_round_fits(arrival=job.arrival, patches=int(plan.indices.size), tokens=tokens):
            return 'it would miss the deadline'
        return Request(job, plan, tokens, round=2)
