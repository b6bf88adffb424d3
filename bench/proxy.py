"""A TCP proxy that adds latency (and, when asked, limits bandwidth), and can cut the link.

Each direction of each connection is a timestamped queue: a reader stamps
every block it reads with ``now + delay`` and keeps reading; a writer sends
each block when its time comes. A block never waits for the one before it to
be delayed first, so a 20 ms RTT link still carries whatever the endpoints
can push (only the bandwidth-delay product is buffered, capped per
direction). Used by the benchmarks and by tests::

    proxy = LatencyProxy("127.0.0.1", server.port, delay_s=0.010)  # 20 ms RTT
    port = await proxy.start()
    ...
    proxy.cut()       # drop every connection, reset new ones
    proxy.restore()   # forward again
    await proxy.stop()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

READ_BYTES = 256 * 1024
# Per direction; a reader pauses when this much is waiting for its delivery time.
MAX_QUEUED_BYTES = 64 * 1024 * 1024


class _Pipe:
    """One direction of a link: read, stamp, queue; deliver each block at its time."""

    def __init__(
        self,
        proxy: LatencyProxy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: bytearray | None = None,
    ):
        self.proxy = proxy
        self.reader = reader
        self.writer = writer
        self.record = record  # where to keep a copy of what this direction carries
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued_bytes = 0
        self.has_data = asyncio.Event()
        self.has_room = asyncio.Event()
        self.has_room.set()

    async def pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        while data := await self.reader.read(READ_BYTES):
            if self.proxy.blackholed:
                continue  # a partition: bytes vanish, nobody is told
            if self.record is not None:
                self.record += data
            self.queue.append((loop.time() + self.proxy.delay_s, data))
            self.queued_bytes += len(data)
            self.has_data.set()
            if self.queued_bytes >= MAX_QUEUED_BYTES:
                self.has_room.clear()
                await self.has_room.wait()
        self.queue.append((loop.time() + self.proxy.delay_s, b""))  # EOF travels with the same delay
        self.has_data.set()

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.has_data.clear()
                await self.has_data.wait()
            due, data = self.queue.popleft()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            if self.proxy.rate_bytes_s:  # a slow link: each block takes its time on the wire
                await asyncio.sleep(len(data) / self.proxy.rate_bytes_s)
            self.queued_bytes -= len(data)
            if self.queued_bytes < MAX_QUEUED_BYTES:
                self.has_room.set()
            await self.writer.drain()


class _Link:
    """One proxied connection: two pipes and the sockets they share."""

    def __init__(self, writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter]):
        self.writers = writers
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            writer.transport.abort()


class LatencyProxy:
    """Forward loopback connections to ``target_host:target_port`` with ``delay_s`` each way."""

    def __init__(self, target_host: str, target_port: int, delay_s: float = 0.0, *, host: str = "127.0.0.1"):
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_s
        self.host = host
        self.port = 0
        self.refusing = False
        self.blackholed = False
        # Each direction of each connection carries at most this many bytes a second (None: any).
        self.rate_bytes_s: float | None = None
        # What clients sent towards the target, in the order it was read (set it to a bytearray
        # to keep a copy: tests read the protocol on the wire).
        self.sent: bytearray | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """``nats://host:port`` of the proxy's listening side."""
        return f"nats://{self.host}:{self.port}"

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            self._drop_all()
            # Let every connection handler finish on its own (a handler cancelled at loop
            # teardown makes asyncio log a spurious error).
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def set_delay(self, delay_s: float) -> None:
        """One-way delay for data read from now on (RTT = 2 x delay_s)."""
        self.delay_s = delay_s

    def cut(self, *, blackhole: bool = False) -> None:
        """Sever the link until :meth:`restore`.

        Default: every connection is reset and new ones are reset on accept
        (the server looks dead). ``blackhole=True``: connections stay open but
        nothing gets through either way and new ones are accepted and ignored
        (a partition; clients only notice through their own timeouts).
        """
        if blackhole:
            self.blackholed = True
        else:
            self.refusing = True
            self._drop_all()

    def restore(self) -> None:
        """Forward again. Connections that lived through a blackhole are reset (they lost bytes)."""
        if self.blackholed:
            self._drop_all()
        self.refusing = False
        self.blackholed = False
        # Each direction of each connection carries at most this many bytes a second (None: any).
        self.rate_bytes_s: float | None = None

    def _drop_all(self) -> None:
        for link in list(self._links):
            link.abort()
        self._links.clear()
        for writer in list(self._held):
            writer.transport.abort()
        self._held.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        if self.refusing:
            writer.transport.abort()
            return
        if self.blackholed:
            self._held.add(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link((writer, up_writer))
        self._links.add(link)
        pipes = (_Pipe(self, reader, up_writer, self.sent), _Pipe(self, up_reader, writer))
        link.tasks = [asyncio.create_task(coro) for pipe in pipes for coro in (pipe.pump_in(), pipe.pump_out())]
        try:
            # Either side resetting ends the link; collect every pump's outcome so none is left unread.
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            link.abort()
            self._links.discard(link)
            await asyncio.gather(*link.tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                writer.close()


async def _serve(target_host: str, target_port: int, delay_s: float) -> None:
    proxy = LatencyProxy(target_host, target_port, delay_s=delay_s)
    port = await proxy.start()
    print(port, flush=True)  # the parent reads the port from our first line
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.proxy HOST PORT --delay-s S``: serve until killed (prints the port first)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.proxy")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--delay-s", type=float, default=0.0, help="one-way delay (RTT = 2x)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.delay_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
