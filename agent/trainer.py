"""Run one trainer as a subprocess and supervise it.

The trainer gets ``command + --mode M --seed S --out DIR + --<hyper> value``,
``TRAINFLEET_JOB_ID`` / ``TRAINFLEET_OUTPUT_DIR`` in its env, its job's data recipe as
JSON in ``TRAINFLEET_DATA`` (:func:`data_env`), and a pipe for
progress reports (``TRAINFLEET_PROGRESS_FD``, see trainfleet.agent.progress).
Of the agent's own environment it inherits only an allowlist (INHERITED_ENV): never
NATS credentials. It runs in its own process group so stopping it takes its children too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from trainfleet.agent import hostos
from trainfleet.agent.progress import read_progress_lines
from trainfleet.agent.sandbox import Confinement
from trainfleet.broker.schema import JobSpec

log = logging.getLogger("trainfleet.agent")

OutputCallback = Callable[[str, bytes], Awaitable[None]]
ProgressCallback = Callable[[dict[str, Any]], Awaitable[None]]

STDERR_TAIL_LINES = 30
# What a trainer inherits from the agent's environment: enough to find programs, libraries
# and the GPU, never the agent's NATS credentials or settings (trainers are untrusted code).
INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "SYSTEMROOT",
    # Windows: what its runtime and common libraries expect (absent on POSIX hosts)
    "SYSTEMDRIVE",
    "WINDIR",
    "COMSPEC",
    "PATHEXT",
    "USERPROFILE",
    "APPDATA",
    "LOCALAPPDATA",
    "PROGRAMDATA",
    "NUMBER_OF_PROCESSORS",
    "PROCESSOR_ARCHITECTURE",
)
INHERITED_PREFIXES = ("LC_", "NVIDIA_")


def trainer_base_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of the agent's environment a trainer gets (an allowlist; see INHERITED_ENV)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k in INHERITED_ENV or k.startswith(INHERITED_PREFIXES)}


def data_env(spec: JobSpec) -> str:
    """``TRAINFLEET_DATA``: the job's data recipe (the manifest's ``data`` or ``split_recipe``
    over its model's ``data``) as compact JSON with sorted keys; ``{}`` when it has none.

    An environment variable, not a flag: a trainer that takes no recipe runs unchanged (an
    unknown ``--data`` would be a usage error for a strict argument parser)."""
    return json.dumps(spec.data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def hyper_arg(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_argv(spec: JobSpec, output_dir: Path, python: str = sys.executable) -> list[str]:
    """The trainer's command line: ``command --<hyper>=<value>... --mode=M --seed=S --out=DIR``.

    One ``--key=value`` word per flag, so a value that starts with ``-`` is never read as an
    option, and the agent's own flags last, so (argparse keeping the last of a repeated flag)
    no hyper parameter can override them."""
    argv = [python if part == "{python}" else part for part in spec.command]
    argv += [f"--{key}={hyper_arg(spec.hyper[key])}" for key in sorted(spec.hyper)]
    argv += [f"--mode={spec.mode}", f"--seed={spec.seed}", f"--out={output_dir}"]
    return argv


class TrainerProcess:
    """One trainer subprocess: start, relay output and progress, stop."""

    def __init__(
        self,
        spec: JobSpec,
        output_dir: Path,
        *,
        env: dict[str, str] | None = None,
        on_output: OutputCallback | None = None,
        on_progress: ProgressCallback | None = None,
        confinement: Confinement | None = None,
    ):
        self.spec = spec
        self.output_dir = output_dir
        self.extra_env = env or {}
        self.on_output = on_output
        self.on_progress = on_progress
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._readers: list[asyncio.Task[None]] = []
        self.stopped_by_us = False
        self.confinement = confinement or Confinement()
        self.left_behind = 0  # processes the trainer left running when it exited (killed)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        pipe = hostos.progress_pipe()  # POSIX: an fd; Windows: an inherited handle
        env = trainer_base_env()
        env.update(self.extra_env)
        env.update(
            {
                "TRAINFLEET_JOB_ID": self.spec.job_id,
                "TRAINFLEET_OUTPUT_DIR": str(self.output_dir),
                "TRAINFLEET_DATA": data_env(self.spec),
                **pipe.env,
                "PYTHONUNBUFFERED": "1",
            }
        )
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *build_argv(self.spec, self.output_dir),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(self.output_dir),
                **pipe.popen_kwargs,
                **hostos.new_process_group_kwargs(self.confinement.preexec),
            )
        except (OSError, subprocess.SubprocessError):
            pipe.abandon()
            self.confinement.cleanup(None)
            raise
        finally:
            pipe.child_started()
        hostos.attach_tree(self.proc.pid)  # Windows: a Job Object; POSIX: nothing to do
        assert self.proc.stdout and self.proc.stderr
        self._readers = [
            asyncio.create_task(self._relay(self.proc.stdout, "stdout")),
            asyncio.create_task(self._relay(self.proc.stderr, "stderr")),
            asyncio.create_task(self._progress(pipe)),
        ]

    async def _relay(self, stream: asyncio.StreamReader, name: str) -> None:
        while line := await stream.readline():
            if name == "stderr":
                self.stderr_tail.append(line.decode(errors="replace").rstrip())
            if self.on_output:
                await self.on_output(name, line)

    async def _progress(self, pipe: hostos.ProgressPipe) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe.reader())
        try:
            while line := await reader.readline():
                # Malformed lines are skipped: a trainer's garbage must not break supervision.
                for event in read_progress_lines(line):
                    if self.on_progress:
                        await self.on_progress(event)
        finally:
            transport.close()

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        # Whatever it started goes with it, on every outcome: its group, and its cgroup.
        self.left_behind = self.confinement.cleanup(self.proc.pid)
        if self.left_behind:
            log.info("trainer of %s left %d process(es) behind; killed", self.spec.job_id[:12], self.left_behind)
        # Output readers finish once the pipes close; don't hang on a grandchild holding them.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._readers, return_exceptions=True), 5.0)
        return code

    def _signal_group(self, *, hard: bool) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        hostos.signal_tree(self.proc.pid, hard=hard)

    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM the trainer's process group, SIGKILL after ``grace_s`` (Windows:
        CTRL_BREAK_EVENT, then its Job Object terminated; see agent/hostos.py)."""
        if self.proc is None:
            return None
        self.stopped_by_us = True
        self._signal_group(hard=False)
        try:
            return await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            self._signal_group(hard=True)
            return await self.proc.wait()

    def error_tail(self) -> str:
        return "\n".join(self.stderr_tail)[-4000:]
