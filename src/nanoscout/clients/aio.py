"""An asyncio subscriber: the daemon's results in ``async for``, for notebooks and async apps.

>>> import asyncio
>>> async def main() -> None:
...     async with AsyncSubscriber(RESULTS, topics=("det.",)) as sub:  # e.g. tcp://127.0.0.1:5556
...         await sub.wait_ready()
...         async for msg in sub.messages(timeout=60):
...             print(msg.header.source, msg.to_pandas()["ecd_nm"].median() > 0)
...             break
>>> asyncio.run(main())
sim True

(``RESULTS``: the daemon's result endpoint; the example runs against a real daemon in the
doctests, ``tests/conftest.py``.)

It wraps :class:`nanoscout.clients.subscriber.Subscriber` (same topics, CURVE keys, gap and
rejection counts: :attr:`AsyncSubscriber.sync`) and runs its blocking receive on one private
worker thread, so the event loop never blocks and the ZeroMQ socket is only ever used from
that one thread. Receives wait at most ``poll_s`` at a time, so cancelling a task (or leaving
the ``async with``) ends within about that long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.protocol import HealthHeader, Message

__all__ = ["AsyncSubscriber"]


class AsyncSubscriber:
    """``Subscriber`` for asyncio: ``await recv()``, ``async for msg in messages()``."""

    def __init__(self, endpoint: str, topics: tuple[str, ...] = ("det.", "stats.", "class.",
                                                                "alert.", "health"),
                 *, poll_s: float = 0.1, **kwargs: Any) -> None:
        """``kwargs`` go to :class:`Subscriber` (``curve``, ``hwm``); ``poll_s``: the longest
        single wait on the socket, s."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoscout-aio")
        self._poll_s = poll_s
        # the socket is created on the worker thread and only ever touched there
        self.sync: Subscriber = self._pool.submit(Subscriber, endpoint, topics, **kwargs).result()

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def recv(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after ``timeout`` s (None: wait for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = self._poll_s if deadline is None else max(0.0, min(
                self._poll_s, deadline - time.monotonic()))
            msg = await self._call(self.sync.recv, wait)
            if msg is not None:
                return msg
            if deadline is not None and time.monotonic() >= deadline:
                return None

    async def wait_ready(self, timeout: float = 10.0) -> HealthHeader:
        """Wait for the daemon's first ``health`` message; TimeoutError names the endpoint after
        ``timeout`` s. Waits ``poll_s`` at a time, as :meth:`recv` does: a cancelled wait
        leaves the worker free within about that long."""
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(self._poll_s, deadline - time.monotonic()))
            try:
                return await self._call(self.sync.wait_ready, wait)  # type: ignore[no-any-return]
            except TimeoutError:
                if time.monotonic() >= deadline:
                    refused = self.sync.refused()  # a daemon of another version is there
                    raise TimeoutError(f"no health message from the daemon at "
                                       f"{self.sync.endpoint} within {timeout} s"
                                       + ("" if refused is None else f": {refused}")
                                       ) from None

    async def messages(self, timeout: float | None = None,
                       idle: float | None = None) -> AsyncIterator[Message]:
        """Yield messages until ``timeout`` s in total or ``idle`` s without one have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            remaining = None if deadline is None else deadline - time.monotonic()
            wait = remaining if idle is None else (idle if remaining is None
                                                   else min(idle, remaining))
            msg = await self.recv(wait)
            if msg is None:
                if idle is not None:
                    return
                continue
            yield msg

    async def close(self) -> None:
        """Close the socket (on its thread) and stop the worker."""
        await self._call(self.sync.close)
        self._pool.shutdown(wait=True)

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
