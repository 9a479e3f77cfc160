# SPDX-License-Identifier: Apache-2.0
"""The edge's side of the cloud's answers, in this process: a BUSY answer (shed, or too late for
its deadline) frees the request's window slot at once and the frame falls back now; a burst of
forged answers is dropped before anything costly, each for the same small, fixed work."""

from __future__ import annotations

import time

import numpy as np
import pytest
from rclpy.serialization import serialize_message
from sage_ros_msgs.msg import CloudResult, OffloadResult
from std_msgs.msg import Header

from sage_ros.core.link import BudgetController, LinkEstimator, UplinkMonitor
from python_lines import python_lines


@pytest.fixture(scope='module')
def edge(ros_edge_node):
    return ros_edge_node


def _in_flight(edge, rid: str) -> None:
    """A request of ``rid`` out for a frame that waits for it, as the edge books one."""
    from sage_ros.core.answers import Offloaded
    from sage_ros.nodes.edge_node import _Frame

    frame = _Frame(None, Header(), time.monotonic(), result=OffloadResult(request_id=rid, label=7, edge_label=7))
    job = Offloaded(rid, frame.received, None, np.arange(32), owner=frame)
    edge._monitor.sent(rid, request_bytes=20_000, patches=32, payload_bytes=19_000, deadline=frame.received + 60,
                       context=job)


def test_a_busy_answer_frees_the_window_slot_at_once_and_does_not_teach_the_server_time():
    now = [0.0]
    monitor = UplinkMonitor(BudgetController(deadline_s=1.5, budget_min=8, budget_max=96), LinkEstimator(),
                            max_in_flight=2, clock=lambda: now[0])
    for rid in ('r/0', 'r/1'):
        monitor.sent(rid, request_bytes=20_000, patches=32, payload_bytes=19_000, deadline=1.5)
    assert monitor.admit(arrival=0.0, fixed_budget=32).cause == 'window_full'
    now[0] = 0.1
    assert monitor.answered('r/0', 0.001, 0.001, computed=False) is not None  # its frame falls back now
    assert monitor.in_flight == 1 and monitor.admit(arrival=0.1, fixed_budget=32).budget == 32
    assert monitor.link.server_time_s(32) == 0.0  # a BUSY answer says nothing of the server's time
    now[0] = 0.5
    monitor.answered('r/1', 0.3, 0.25)
    assert monitor.link.server_time_s(32) == pytest.approx(0.25)


def test_a_busy_answer_gives_the_frame_its_edge_label_at_once(edge):
    before = edge.stats.snapshot()
    _in_flight(edge, 'robot9/1-00000000000000aa')
    window = edge._monitor.in_flight
    edge._on_answer(serialize_message(CloudResult(request_id='robot9/1-00000000000000aa',
                                                  status=CloudResult.STATUS_BUSY,
                                                  detail='late: the answer would come after the deadline')))
    after = edge.stats.snapshot()
    assert after['fallback'] - before['fallback'] == 1 and edge._monitor.in_flight == window - 1
    assert not edge._monitor.expects('robot9/1-00000000000000aa')


def test_a_burst_of_forged_answers_is_dropped_before_it_is_parsed(edge, monkeypatch):
    """5,000 answers with ids never sent, around a real one: only the real one is parsed and
    acted on; each forged one costs the same few lines (no parse, no log line), far less than
    parsing one answer, so a burst does not hold up the real answers behind it."""
    import sage_ros.nodes.edge_node as edge_module

    parsed, logged = [], []
    real = edge_module.typestore()

    class CountingTypestore:
        def deserialize_cdr(self, data, name):
            parsed.append(name)
            return real.deserialize_cdr(data, name)

    class CountingLogger:
        def __getattr__(self, level):
            return lambda *a, **k: logged.append(level)

    monkeypatch.setattr(edge_module, 'typestore', CountingTypestore)
    monkeypatch.setattr(edge, 'get_logger', CountingLogger)
    monkeypatch.setattr(edge, '_unknown_answer_logged', -float('inf'))
    forged = [serialize_message(CloudResult(request_id=f'robot9/{i}-{i:016x}', status=CloudResult.STATUS_OK,
                                            labels=np.array([999], np.int32), scores=np.array([1.0], np.float32)))
              for i in range(5000)]
    genuine = [serialize_message(CloudResult(request_id=f'robot9/2-00000000000000b{k}', status=CloudResult.STATUS_OK,
                                             labels=np.array([3], np.int32), scores=np.array([0.9], np.float32)))
               for k in range(2)]
    before = edge.stats.snapshot()
    _in_flight(edge, 'robot9/2-00000000000000b0')
    edge._on_answer(forged[0])
    cost = [python_lines(lambda: edge._on_answer(forged[1]))]
    for data in forged[2:2500]:
        edge._on_answer(data)
    cost.append(python_lines(lambda: edge._on_answer(forged[2500])))
    edge._on_answer(genuine[0])
    for data in forged[2501:]:
        edge._on_answer(data)
    after = edge.stats.snapshot()
    assert after['late_answers'] - before['late_answers'] == 5000
    assert after['cloud'] - before['cloud'] == 1 and not edge._monitor.expects('robot9/2-00000000000000b0')
    assert parsed == ['sage_ros_msgs/msg/CloudResult']  # the real answer only
    assert 1 <= len(logged) < 10  # a log line now and then, not one per forged answer
    # The same fixed work for the 2nd forged answer and the 2,501st, and far less than what an
    # answer that is parsed and acted on costs.
    _in_flight(edge, 'robot9/2-00000000000000b1')
    acted_on = python_lines(lambda: edge._on_answer(genuine[1]))
    assert cost[0] == cost[1] and 10 * cost[0] < acted_on, (cost, acted_on)
