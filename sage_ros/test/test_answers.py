# SPDX-License-Identifier: Apache-2.0
"""The edge's answer bookkeeping without ROS (core.answers.AnswerBook): which one final result
an offloaded frame gets from round 1, round 2, a timeout, a failed send or a shutdown, and when
a second round is sent. Time is a fake clock; the link is taught by answers the test gives."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from sage_ros.core.answers import AnswerBook, Final, OffloadSettings, Refused, Request, Status, answer_times
from sage_ros.core.link import BudgetController, LinkEstimator, UplinkMonitor
from sage_ros.core.models import EdgeOutput
from sage_ros.core.offload import SelectionConfig
from sage_ros.core.pipeline import FrameDecision
from sage_ros.core.preprocess import resize_crop

DEADLINE_S = 2.0


def _decision(seed: int = 0) -> FrameDecision:
    """An offloaded frame as the edge sees it (random crop, attention and embeddings)."""
    rng = np.random.default_rng(seed)
    crop, cmap = resize_crop(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), crop_pct=0.875)
    probs = rng.dirichlet(np.ones(1000)).astype(np.float32)
    edge = EdgeOutput(np.log(probs), probs, rng.random(196).astype(np.float32),
                      rng.standard_normal((196, 192)).astype(np.float32))
    top, conf = edge.topk(5)
    return FrameDecision(crop, cmap, edge, top, conf, 5.0, 5.0, True, 0.01)


def _answer(rid: str, status: Status = Status.OK, **fields) -> SimpleNamespace:
    """A CloudResult as the edge parses it."""
    labels = fields.pop('labels', [3] if status in (Status.OK, Status.MORE) else [])
    return SimpleNamespace(request_id=rid, status=int(status), labels=np.asarray(labels, np.int32),
                           scores=np.full(len(labels), 0.9, np.float32), detail=fields.pop('detail', ''),
                           more_patches=fields.pop('more_patches', 0), roi_indices=fields.pop('roi', []),
                           round=fields.pop('round', 1))


class Edge:
    """An AnswerBook over a monitor with a fake clock, and the link taught one answer."""

    def __init__(self, *, second_round: str = 'continue', max_in_flight: int = 4, budget_max: int = 96) -> None:
        self.now = 0.0
        self.monitor = UplinkMonitor(BudgetController(deadline_s=DEADLINE_S, budget_min=8, budget_max=budget_max),
                                     LinkEstimator(), max_in_flight=max_in_flight, clock=lambda: self.now)
        self.book = AnswerBook(self.monitor, OffloadSettings(DEADLINE_S, second_round, budget_max,
                                                             SelectionConfig(encoding='raw')))
        self.monitor.sent('warm', request_bytes=20_000, patches=32, payload_bytes=19_000)
        self.now = 0.02
        self.monitor.answered('warm', 0.005, 0.004)  # 1 MB/s, a fast server: a second round fits
        assert self.monitor.link.throughput_bps > 0

    def offload(self, rid: str, fixed_budget: int = 32) -> Request:
        request = self.book.offload(rid, _decision(), arrival=self.now, fixed_budget=fixed_budget, owner=rid)
        assert isinstance(request, Request), request
        self.book.sending(request, 20_000)
        return request


def test_the_status_values_are_the_messages():
    from sage_ros_msgs.msg import CloudResult

    for status in Status:
        assert getattr(CloudResult, f'STATUS_{status.name}') == status.value


def test_a_cloud_answer_is_the_final_result_once():
    edge = Edge()
    request = edge.offload('r/1')
    assert request.round == 1 and request.budget == 32 and request.plan.indices.size == 32
    final = edge.book.answered(_answer('r/1'), 0.01, 0.008)
    assert isinstance(final, Final) and final.answer.labels[0] == 3 and final.detail == '' and final.job.owner == 'r/1'
    assert edge.book.answered(_answer('r/1'), 0.01, 0.008) is None  # a repeat: no second result
    edge.now += 10
    assert edge.book.expired() == []


@pytest.mark.parametrize('status, detail, why', [
    (Status.BUSY, 'late: the answer would come after the deadline', 'cloud busy: late: the answer would come'),
    (Status.REJECTED, 'bad indices', 'cloud rejected: bad indices'),
    (Status.ERROR, '', 'cloud error'),
])
def test_a_failed_answer_gives_the_edge_label_and_frees_the_window_now(status, detail, why):
    edge = Edge(max_in_flight=1)
    edge.offload('r/1')
    assert edge.book.offload('r/2', _decision(), arrival=edge.now, fixed_budget=32).cause == 'window_full'
    final = edge.book.answered(_answer('r/1', status, detail=detail), 0.001, 0.0)
    assert final.answer is None and final.detail.startswith(why)
    assert isinstance(edge.book.offload('r/2', _decision(), arrival=edge.now, fixed_budget=32), Request)


def test_an_ok_answer_without_labels_is_an_error():
    edge = Edge()
    edge.offload('r/1')
    final = edge.book.answered(_answer('r/1', Status.OK, labels=[]), 0.01, 0.01)
    assert final.answer is None and final.detail == 'cloud error'


def test_a_timeout_falls_back_once_and_a_late_answer_only_measures():
    edge = Edge()
    edge.offload('r/1')
    edge.now += DEADLINE_S / 2
    assert edge.book.expired() == []
    edge.now += DEADLINE_S
    finals = edge.book.expired()
    assert [(f.answer, f.detail) for f in finals] == [(None, 'timeout')]
    assert edge.book.expired() == []
    assert edge.book.answered(_answer('r/1'), 0.01, 0.01) is None


def test_more_asked_sends_a_second_round_whose_answer_is_final():
    edge = Edge()
    first = edge.offload('r/1')
    step = edge.book.answered(_answer('r/1', Status.MORE, more_patches=16), 0.01, 0.008)
    assert isinstance(step, Request) and step.round == 2 and step.plan.indices.size == 16
    assert not set(step.plan.indices.tolist()) & set(first.plan.indices.tolist())  # new patches only
    assert step.budget == step.tokens == 48
    edge.book.sending(step, 10_000)
    final = edge.book.answered(_answer('r/1', Status.OK, labels=[9], round=2), 0.01, 0.01)
    assert final.answer.labels[0] == 9 and final.detail == ''


def test_a_second_round_that_fails_keeps_round_ones_answer():
    edge = Edge()
    edge.offload('r/1')
    step = edge.book.answered(_answer('r/1', Status.MORE, more_patches=16), 0.01, 0.008)
    edge.book.sending(step, 10_000)
    edge.now += 2 * DEADLINE_S
    final, = edge.book.expired()
    assert final.answer.status == Status.MORE and final.detail == 'second round failed (timeout): round-1 answer'


@pytest.mark.parametrize('setup, more, why', [
    ({'second_round': 'off'}, 16, 'second_round is off'),
    ({'budget_max': 32}, 16, 'budget_max reached'),
    ({}, 0, 'budget_max reached'),
])
def test_no_second_round_gives_round_ones_answer_and_says_why(setup, more, why):
    edge = Edge(**setup)
    edge.offload('r/1')
    final = edge.book.answered(_answer('r/1', Status.MORE, more_patches=more), 0.01, 0.008)
    assert isinstance(final, Final) and final.answer.status == Status.MORE
    assert final.detail == f'no second round: {why}'


def test_no_second_round_without_an_uplink_or_when_it_would_miss_the_deadline():
    edge = Edge()
    edge.offload('r/1')
    edge.monitor.set_connected(False)
    final = edge.book.answered(_answer('r/1', Status.MORE, more_patches=16), 0.01, 0.008)
    assert final.detail == 'no second round: no uplink'
    edge = Edge()
    edge.offload('r/2')
    edge.now += DEADLINE_S * 0.99  # the answer came close to the deadline
    final = edge.book.answered(_answer('r/2', Status.MORE, more_patches=16), 0.01, 0.008)
    assert final.detail == 'no second round: it would miss the deadline'


def test_a_failed_send_falls_back_unless_the_frame_already_has_its_result():
    edge = Edge()
    request = edge.offload('r/1')
    final = edge.book.send_failed(request, RuntimeError('no uplink'))
    assert final.answer is None and final.detail == 'send failed: no uplink'
    request = edge.offload('r/2')
    edge.book.answered(_answer('r/2'), 0.01, 0.01)
    assert edge.book.send_failed(request, RuntimeError('late')) is None


def test_refusals_say_why_and_name_their_counter():
    edge = Edge()
    edge.monitor.set_connected(False)
    refused = edge.book.offload('r/1', _decision(), arrival=edge.now, fixed_budget=32)
    assert refused == Refused('no uplink', 'no_uplink')
    edge.monitor.set_connected(True)
    book = AnswerBook(edge.monitor, OffloadSettings(DEADLINE_S, 'off', 96, SelectionConfig(
        method='attention_threshold', method_params={'delta': 1.0})))
    refused = book.offload('r/2', _decision(), arrival=edge.now, fixed_budget=32)
    assert refused.reason == 'attention_threshold selected no patch' and refused.budget == 32 and not refused.cause


def test_every_offloaded_frame_gets_exactly_one_final_result():
    """Random interleavings of answers of every kind, repeats, second rounds, failed sends,
    timeouts and a shutdown: each frame ends with one Final, never two."""
    rng = random.Random(7)
    for trial in range(30):
        edge = Edge(max_in_flight=64)
        finals: dict[str, list[Final]] = {}
        pending: list[Request] = []

        def record(step):
            if isinstance(step, Final):
                finals.setdefault(step.job.request_id, []).append(step)
            elif isinstance(step, Request):
                edge.book.sending(step, 5_000)
                pending.append(step)

        for i in range(40):
            edge.now += rng.uniform(0.0, 0.3)
            rid = f'r/{trial}-{i}'
            pending.append(edge.offload(rid))
            finals.setdefault(rid, [])
            for _ in range(rng.randint(0, 3)):
                if not pending:
                    break
                request = rng.choice(pending)
                kind = rng.choice(['ok', 'more', 'busy', 'rejected', 'repeat', 'send_failed'])
                if kind == 'send_failed':
                    record(edge.book.send_failed(request, RuntimeError('x')))
                    continue
                status = {'ok': Status.OK, 'repeat': Status.OK, 'more': Status.MORE, 'busy': Status.BUSY,
                          'rejected': Status.REJECTED}[kind]
                record(edge.book.answered(_answer(request.job.request_id, status, more_patches=8),
                                          *answer_times(0.0, 0.001, 0.01)))
            for final in edge.book.expired():
                record(final)
        for final in edge.book.drain('shutdown'):
            record(final)
        counts = {rid: len(f) for rid, f in finals.items()}
        assert set(counts.values()) == {1}, {rid: n for rid, n in counts.items() if n != 1}
