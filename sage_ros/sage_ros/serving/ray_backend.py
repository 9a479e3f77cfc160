# SPDX-License-Identifier: Apache-2.0
"""The server model as a Ray Serve deployment, for a cloud that spreads over machines.

The Zenoh-facing cloud node stays the ingress: it validates, decodes and schedules requests
fairly, then hands each to this backend, which calls the deployment once per request. Serve
routes the calls over the replicas (a fixed number, or autoscaled), and each replica groups
the calls it receives into batches with ``@serve.batch``. A call that fails because its
replica died is retried once (Serve routes it to a live replica); one that fails again is
reported to the node, which answers that request ERROR, so its robot falls back at once:
every request is answered exactly once.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import numpy as np

from sage_ros.core.errors import SageError
from sage_ros.serving.local import Request

APP = 'sage_cloud'


class ServingError(SageError):
    """The serving backend cannot be reached or started."""


def _deployment() -> Any:
    """The Serve deployment class (built on demand: importing Ray costs seconds)."""
    from ray import serve

    @serve.deployment(name='ServerModel')
    class ServerModel:
        """One replica: the server model in-process, batching the calls it receives."""

        def __init__(self, model: str, weights: str, device: str, num_threads: int, precision: str, max_batch: int,
                     batch_wait_s: float) -> None:
            from sage_ros.serving.local import LocalBackend

            self.backend = LocalBackend(model, weights, device=device, num_threads=num_threads, precision=precision)
            import ray

            # The replica's actor name: unique, and what ray.get_actor(name, namespace='serve') takes.
            self.replica = ray.get_runtime_context().get_actor_name()
            self.classify.set_max_batch_size(max_batch)
            self.classify.set_batch_wait_timeout_s(batch_wait_s)

        def info(self) -> dict[str, Any]:
            b = self.backend
            return {'name': b.name, 'weights': b.weights, 'random_weights': b.random_weights, 'replica': self.replica,
                    'geometry': b.geometry}

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def classify(self, requests: list[Request]) -> list[tuple[np.ndarray, np.ndarray, str]]:
            probs, attention = self.backend.classify_attended(list(requests))
            return [(row, att, self.replica) for row, att in zip(probs, attention)]

    return ServerModel


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast on a head that does not answer: ray.init itself retries for a minute or more."""
    hostport = address.removeprefix('ray://')
    host, sep, port = hostport.rpartition(':')
    if not sep or not port.isdigit():
        return  # '' (start one) or 'auto': Ray finds it, or says at once that there is none
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ServingError(f'cannot reach Ray at {address}: {exc.strerror or exc} '
                           f'(start one with `ray start --head`, or set ray_address)') from None


class RayBackend:
    """Classifies batches through a Ray Serve deployment of the server model.

    ``address``: '' starts a Ray instance in this process (one machine); 'auto' or
    'HOST:6379' joins a cluster started with ``ray start --head``. ``autoscaling`` is Serve's
    autoscaling_config as JSON (e.g. '{"min_replicas": 1, "max_replicas": 4}'), and replaces
    ``replicas`` when given.
    """

    def __init__(self, model: str, weights: str, *, address: str = '', replicas: int = 1, autoscaling: str = '',
                 replica_cpus: float = 1.0, device: str = 'cpu', num_threads: int = 0, precision: str = 'fp32',
                 max_batch: int = 8,
                 batch_wait_ms: float = 5.0, timeout_s: float = 30.0) -> None:
        try:
            import ray
            from ray import serve
        except ImportError as exc:
            raise ServingError(f'backend ray needs ray[serve] installed: {exc}') from None
        self._timeout_s = timeout_s
        self._started_ray = False
        _check_reachable(address)
        try:
            if not ray.is_initialized():
                # The replicas must import sage_ros as this process does (an editable install).
                ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                         ignore_reinit_error=True, runtime_env={'env_vars': {
                             'SAGE_ROS_CONFIG_DIR': os.environ.get('SAGE_ROS_CONFIG_DIR', '')}})
                self._started_ray = not address
        except Exception as exc:  # ConnectionError, RuntimeError, ...: Ray says why
            where = address or 'a local instance'
            raise ServingError(f'cannot reach Ray at {where}: {str(exc).splitlines()[0]} '
                               f'(start one with `ray start --head`, or set ray_address)') from None
        options: dict[str, Any] = {'ray_actor_options': {'num_cpus': replica_cpus},
                                   'max_ongoing_requests': max(2 * max_batch, 4)}
        if autoscaling:
            try:
                options['autoscaling_config'] = json.loads(autoscaling)
            except ValueError as exc:
                raise ServingError(f'ray_autoscaling is not JSON: {exc}') from None
        else:
            options['num_replicas'] = replicas
        app = _deployment().options(**options).bind(model, weights, device, num_threads, precision, max_batch,
                                                    batch_wait_ms / 1e3)
        try:
            self._handle = serve.run(app, name=APP, route_prefix=None)
            info = self._handle.info.remote().result(timeout_s=max(timeout_s, 120.0))
        except Exception as exc:
            raise ServingError(f'Ray Serve could not start the server model: {str(exc).splitlines()[0]}') from None
        self.name, self.weights, self.random_weights = info['name'], info['weights'], info['random_weights']
        self.geometry: tuple[int, int, int, int] = tuple(info['geometry'])
        self.served_by: list[str] = []
        """Replica (actor name) of every answered request, in order (for tests and diagnostics)."""

    def classify(self, requests: list[Request]) -> np.ndarray:
        """Softmax rows in order. A request whose call fails twice gets a row of NaN: the
        caller answers it ERROR (its robot falls back) instead of losing it."""
        return self.classify_attended(requests)[0]

    def classify_attended(self, requests: list[Request]) -> tuple[np.ndarray, list[np.ndarray]]:
        """:meth:`classify`, and the CLS attention over each request's tokens (empty when lost)."""
        calls = [self._handle.classify.remote(r) for r in requests]
        rows, attention = [], []
        for request, call in zip(requests, calls):
            for attempt in range(2):
                try:
                    row, att, replica = call.result(timeout_s=self._timeout_s)
                    self.served_by.append(replica)
                    rows.append(row)
                    attention.append(att)
                    break
                except Exception:  # noqa: BLE001 - a replica died or timed out: retry once
                    if attempt == 0:
                        call = self._handle.classify.remote(request)
            else:
                rows.append(None)
                attention.append(np.empty(0, np.float32))
        width = next((len(r) for r in rows if r is not None), 1000)
        return np.stack([r if r is not None else np.full(width, np.nan, np.float32) for r in rows]), attention

    def close(self) -> None:
        from ray import serve

        try:
            serve.delete(APP)
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass
        if self._started_ray:
            import ray

            serve.shutdown()
            ray.shutdown()
