"""Waiting out a JetStream election: retry a call with bounded backoff, then say so plainly.

While a stream's (or the meta group's) leader is being elected, JetStream calls time out,
find no responders, or answer 503 "JetStream not ready". None of that is worth exiting for:
:func:`patiently` retries such a call (doubling the pause up to a ceiling) until it works or
``limit_s`` passes, logging one "waiting for JetStream" line, and then raises
:class:`~trainfleet.broker.errors.JetStreamUnavailable` (CLI exit 3) with what was tried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors

from trainfleet.broker import jsapi
from trainfleet.broker.errors import TRANSIENT, BrokerError, JetStreamUnavailable, StorageLimit

log = logging.getLogger("trainfleet.broker")

T = TypeVar("T")

FIRST_PAUSE_S = 0.25
MAX_PAUSE_S = 2.0
# How long a command-line call waits out an election before it gives up (exit 3).
CLI_PATIENCE_S = 20.0


def is_election(exc: BaseException) -> bool:
    """Whether ``exc`` is what JetStream answers while it has no leader (or no quorum). A full
    store answers 503 too ("insufficient resources"): that is not an election, and waiting
    does not fix it (StorageLimit errors name what does)."""
    if isinstance(exc, StorageLimit | JetStreamUnavailable):  # (the latter: already waited out)
        return False
    if isinstance(exc, BrokerError) and exc.__cause__ is not None:
        return is_election(exc.__cause__)  # an election met mid-way, named by what it stopped
    if isinstance(exc, nats.js.errors.APIError) and jsapi.storage_limit(
        getattr(exc, "err_code", None), getattr(exc, "description", None) or ""
    ):
        return False
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return True  # 503: JetStream not (yet) available
    if isinstance(exc, nats.js.errors.APIError) and getattr(exc, "code", None) in (503, 408):
        return True
    if isinstance(exc, nats.errors.NoRespondersError | nats.errors.TimeoutError):
        return True
    return isinstance(exc, TRANSIENT)


async def patiently(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    limit_s: float,
    retry_if: Callable[[BaseException], bool] = is_election,
) -> T:
    """``await call()``, again after a pause whenever it meets an election, for up to ``limit_s``."""
    deadline = time.monotonic() + limit_s
    pause = FIRST_PAUSE_S
    told = False
    while True:
        try:
            return await call()
        except Exception as exc:
            if not retry_if(exc):
                raise
            if time.monotonic() + pause > deadline:
                raise JetStreamUnavailable(
                    f"{what}: JetStream did not answer for {limit_s:g}s ({exc!r}); a leader election that "
                    "does not end, or a server without quorum: check the nats-server logs"
                ) from exc
            if not told:
                log.warning("waiting for JetStream (%s: %r)", what, exc)
                told = True
        await asyncio.sleep(pause)
        pause = min(pause * 2, MAX_PAUSE_S)
