"""What the SHA-256 costs an artifact transfer on this machine, against the server's ceiling.

``python -m bench.hashcost [--size-mib 100] [--reps 7]``: the shipped upload and download
(``Artifacts.put`` / ``get``) and the bare client of bench.ceiling, taken in turns, then the
shipped path again with its SHA-256 left out. Left out how: for this run only, the direct
transfer's ``hashlib`` is replaced by one whose digest hashes nothing and reports the digest
the file is known to have, so every check (the info's digest, the content address) passes as
it would. Nothing else changes: same threads, same buffers, same writes and fsyncs.

It shows where the distance to the ceiling comes from (issue 17, item 4): on a machine where
nats-server needs more than one of the two cores to store or serve a transfer, the hash's
~0.56 CPU-s per GiB has no core of its own, and the ceiling client hashes nothing.

Bench-only: this never runs in the product and is never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import time
import types
from collections.abc import Iterator

from bench import ceiling
from bench.env import Env, fleet_env, make_file
from trainfleet.broker import directget
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import Bundle

MIB = 1 << 20


class _Unhashed:
    """A sha256 object that hashes nothing and says the bytes hash to ``known``."""

    def __init__(self, known: bytes):
        self.known = known

    def update(self, data: object) -> None:
        pass

    def digest(self) -> bytes:
        return self.known

    def hexdigest(self) -> str:
        return self.known.hex()


@contextlib.contextmanager
def _without_hash(known_hex: str) -> Iterator[None]:
    real = directget.hashlib
    directget.hashlib = types.SimpleNamespace(sha256=lambda: _Unhashed(bytes.fromhex(known_hex)))
    try:
        yield
    finally:
        directget.hashlib = real


async def _turns(env: Env, size: int, reps: int) -> dict[str, list[float]]:
    src, dest = env.workdir / "src", env.workdir / "dest"
    sha = await asyncio.to_thread(make_file, src, size)
    bundle = Bundle(path=src, sha256=sha, size=size)
    artifacts = Artifacts(env.broker)
    store, url = artifacts.store, env.server.url
    ceiling_subject = store.chunk_subject(f"hashcost{time.time_ns()}")
    await asyncio.to_thread(ceiling.raw_put, url, ceiling_subject, src)  # what the ceiling gets read
    chunks = -(-size // ceiling.CHUNK)
    mb = size / 1e6
    out: dict[str, list[float]] = {}

    async def timed(key: str, coro) -> None:
        started = time.perf_counter()
        await coro
        out.setdefault(key, []).append(mb / (time.perf_counter() - started))

    for rep in range(reps):
        for hashed in (True, False):
            label = "" if hashed else " (no hash)"
            with contextlib.nullcontext() if hashed else _without_hash(sha):
                await timed(f"upload{label}", artifacts.put(bundle))
                await timed(f"download{label}", artifacts.get(sha, dest))
            dest.unlink()
            await store.delete(sha)  # so the next upload is not deduplicated away
        subject = store.chunk_subject(f"hashcost{rep}{time.time_ns()}")
        out.setdefault("ceiling put", []).append(mb / await asyncio.to_thread(ceiling.raw_put, url, subject, src))
        await store._purge(subject)
        consumer = f"hashcost{rep}{time.time_ns()}"
        await store._create_consumer(consumer, ceiling_subject)
        get = functools.partial(ceiling.raw_get, url, store.stream, consumer, chunks, dest)
        out.setdefault("ceiling get", []).append(mb / await asyncio.to_thread(get))
        dest.unlink()
    return out


async def run(size: int, reps: int) -> None:
    async with fleet_env() as env:
        got = await _turns(env, size, reps)
    med = {key: statistics.median(values) for key, values in got.items()}
    label = f"{size // MIB} MiB"
    print(f"{label}, {reps} turns each, median MB/s (all runs):")
    for what, ceiling_key in (("upload", "ceiling put"), ("download", "ceiling get")):
        for key in (what, f"{what} (no hash)"):
            runs = ", ".join(f"{v:,.0f}" for v in got[key])
            print(f"  {key:20s} {med[key]:7,.0f}  {med[key] / med[ceiling_key]:.2f}x of the ceiling  ({runs})")
        runs = ", ".join(f"{v:,.0f}" for v in got[ceiling_key])
        print(f"  {ceiling_key:20s} {med[ceiling_key]:7,.0f}  ({runs})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hashcost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(run(args.size_mib * MIB, args.reps))


if __name__ == "__main__":
    main()
