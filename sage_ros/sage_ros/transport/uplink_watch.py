# SPDX-License-Identifier: Apache-2.0
"""What the edge says when its uplink stays useless: the cause, once, in one line.

The worst case is silent by nature. A Zenoh router's access control drops a put its sender may
not make and tells no one: a robot whose namespace does not match its certificate publishes on
a key the router will not take from it, yet its publisher still matches the cloud's
subscription (the cloud subscribes to ``**/sage/patch_set`` and the router announces that to
every robot), so the edge sends, the cloud never sees a byte, and every frame times out.
:class:`UplinkWatch` tells that apart from a slow cloud, and :func:`problem_line` says what to
check. Plain Python: the edge node feeds it, tests drive it with their own clock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from sage_ros.transport.zenoh_link import Identity

UNANSWERED, NO_CLOUD, NO_ROUTER = 'unanswered', 'no cloud', 'no router'
# The edge's uplink states (transport.uplink.Uplink.state) in which no router is reached.
_ROUTERLESS = ('connecting', 'no router', 'router lost')


@dataclass(frozen=True)
class Trouble:
    """A cause to report: what, how many requests went unanswered, for how long."""

    cause: str
    unanswered: int
    waited_s: float


class UplinkWatch:
    """Whether the uplink has stayed useless for ``silence_s``, and why; each cause reported once.

    - unanswered: the router reports a subscriber for our requests, at least ``min_sent``
      requests or probes went out while it did, the first ``silence_s`` ago, and no answer of
      any kind has come since the session opened. A cloud that is merely slow answers something
      within that time: BUSY at once for a request it cannot serve by its deadline, every probe
      (the edge probes once a second until it has measured the round trip), and late answers,
      which count too. One answer disarms this for good: a route that ever worked was not
      refused by the router.
    - no cloud: a router, but nothing subscribes to our requests, for ``silence_s``.
    - no router: no router reached for ``silence_s``.

    Thread-safe: sends, answers and state updates come from different threads.
    """

    def __init__(self, *, silence_s: float, min_sent: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        self.silence_s = silence_s
        self.min_sent = min_sent
        self._clock = clock
        self._lock = threading.Lock()
        self._state = ''
        self._state_since = clock()
        self._answered = False
        self._sent = 0
        self._first_sent = 0.0
        self._reported: set[str] = set()
        self.cause = ''
        """The reported cause that still holds ('' when none)."""

    def sent(self) -> None:
        """A request or probe went out (only done while the router reports a subscriber)."""
        with self._lock:
            if self._answered:
                return
            if not self._sent:
                self._first_sent = self._clock()
            self._sent += 1

    def answered(self) -> bool:
        """Something arrived on our answer key. True when it ends a reported 'unanswered'."""
        with self._lock:
            self._answered = True
            ended = self.cause == UNANSWERED
            if ended:
                self.cause = ''
            return ended

    def said(self, cause: str) -> None:
        """The caller reported ``cause`` itself (an endpoint that does not resolve: at once)."""
        with self._lock:
            self._reported.add(cause)
            self.cause = cause

    def update(self, state: str) -> Trouble | None:
        """The uplink's state now ('connecting', 'no router', 'router lost', 'no cloud',
        'connected'); returns a cause the first time it is due, else None."""
        with self._lock:
            now = self._clock()
            if state != self._state:
                self._state, self._state_since = state, now
                if state != 'connected':
                    self._sent = 0  # the route went away: whatever was sent is explained
                else:
                    self._reported -= {NO_CLOUD, NO_ROUTER}  # a later outage is news again
                if self.cause and self.cause != self._cause_of(state):
                    self.cause = ''
            due = self._due(state, now)
            if due is None or due.cause in self._reported:
                return None
            self._reported.add(due.cause)
            self.cause = due.cause
            return due

    @staticmethod
    def _cause_of(state: str) -> str:
        return {'connected': UNANSWERED, 'no cloud': NO_CLOUD}.get(state, NO_ROUTER if state in _ROUTERLESS else '')

    def _due(self, state: str, now: float) -> Trouble | None:
        if state == 'connected':
            waited = now - self._first_sent
            if not self._answered and self._sent >= self.min_sent and waited >= self.silence_s:
                return Trouble(UNANSWERED, self._sent, waited)
            return None
        waited = now - self._state_since
        cause = self._cause_of(state)
        return Trouble(cause, 0, waited) if cause and waited >= self.silence_s else None


@dataclass(frozen=True)
class RouteContext:
    """What the edge knows about its route to the cloud, for the lines it logs."""

    put_key: str
    sub_key: str
    namespace: str
    """The node's namespace without slashes ('' when none)."""
    config: Path
    identity: Identity | None
    endpoints: tuple[str, ...]


def _as_robot(ctx: RouteContext, robot: str) -> str:
    """The key ``robot`` would put on: ours with our namespace replaced."""
    ns = ctx.namespace
    rest = ctx.put_key[len(ns) + 1:] if ns and ctx.put_key.startswith(ns + '/') else ctx.put_key
    return f'{robot}/{rest}'


def problem_line(trouble: Trouble, ctx: RouteContext) -> str:
    """One line: what is wrong with the uplink, which key, namespace and config, what to check."""
    ns = f'namespace /{ctx.namespace}' if ctx.namespace else 'no namespace'
    who = ctx.identity
    login = f', logging in as {who.name!r} ({who.evidence})' if who and who.name else (
        f', logging in with {who.evidence}' if who else ', with no certificate or user')
    if trouble.cause == UNANSWERED:
        head = (f'uplink: {trouble.unanswered} requests on {ctx.put_key!r} got no answer in {trouble.waited_s:.0f} s '
                'although the router reports the cloud subscribed: the router drops them, most likely by its '
                f'access control. This edge runs with {ns} and Zenoh config {ctx.config}{login}')
        if who and who.name and who.name != ctx.namespace:
            own = (f' or give it the Zenoh config of its own name (zenoh_{ctx.namespace}.json5 from `sage-ros certs`)'
                   if ctx.namespace else '')
            return (f'{head}; a router from `sage-ros certs` lets {who.name!r} put only on '
                    f'{_as_robot(ctx, who.name)!r}: run this robot with namespace {who.name}{own}')
        return (f'{head}; check that the router\'s access_control lets this identity put on {ctx.put_key!r} and '
                f'subscribe to {ctx.sub_key!r}')
    if trouble.cause == NO_CLOUD:
        return (f'uplink: a router is reached, but for {trouble.waited_s:.0f} s nothing subscribes to {ctx.put_key!r}: '
                f'is sage_cloud running against this router? ({ns}, Zenoh config {ctx.config}{login}); '
                'frames keep edge labels')
    return (f'uplink: no Zenoh router reached in {trouble.waited_s:.0f} s at {", ".join(ctx.endpoints) or "(none)"} '
            f'(Zenoh config {ctx.config}, or zenoh_connect); still trying; frames keep edge labels')


def unresolved_line(host: str, endpoint: str, ctx: RouteContext) -> str:
    """One line: an endpoint whose host resolves to no address (Zenoh retries it silently)."""
    return (f'uplink: cannot resolve {host!r} of Zenoh endpoint {endpoint} (Zenoh config {ctx.config}, or '
            'zenoh_connect); still trying; frames keep edge labels')
