"""``trainfleet agent``: run an agent on this host, or print what it detects.

The CLI (controller/cli.py) adds this verb with :func:`add_arguments` and dispatches
to :func:`cmd_agent`; everything the agent command means lives here, beside the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.handlers
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import msgspec

from trainfleet.agent import health, hostos, logfmt, pid1
from trainfleet.agent.sandbox import TrainerUser
from trainfleet.broker.errors import EXIT_OK
from trainfleet.broker.settings import from_flags

STOP_FILE_ENV = "TRAINFLEET_STOP_FILE"
STOP_FILE_NAME = "agent.stop"
HELP = "run an agent on this host (or --detect to print its capability)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host-id", help="host id (env TRAINFLEET_HOST_ID; default: hostname)")
    p.add_argument("--detect", action="store_true", help="print detected capability and exit")
    p.add_argument(
        "--health",
        action="store_true",
        help="judge the running agent's health file and exit: 0 healthy, 1 not, with a one-line reason "
        "(for a container or Kubernetes probe; give the agent's --workdir or --health-file)",
    )
    p.add_argument(
        "--health-file",
        metavar="PATH",
        help="the health file the agent rewrites every heartbeat (env TRAINFLEET_HEALTH_FILE; default "
        "WORKDIR/agent-health.json, or $TMPDIR/trainfleet-agent-HOST.health.json without --workdir)",
    )
    p.add_argument(
        "--log-format",
        choices=logfmt.FORMATS,
        default="text",
        help="text (default, stderr) or json: one JSON object per line on stdout (time, level, logger, "
        "message, host, job_id)",
    )
    p.add_argument("--json", action="store_true", help="with --detect: JSON")
    p.add_argument("--cpu-slots", type=int, default=1, help="CPU jobs at once (default 1)")
    p.add_argument("--gpu-slots", type=int, help="GPU jobs at once (default: one per visible GPU)")
    p.add_argument("--no-cpu", action="store_true", help="a GPU host that takes no CPU-only jobs")
    p.add_argument("--max-cores", type=float, help="offer at most this many cores")
    p.add_argument("--max-ram-gib", type=float, help="offer at most this much RAM")
    p.add_argument("--max-vram-gib", type=float, help="offer at most this much VRAM per GPU")
    p.add_argument("--workdir", help="where trainer outputs are written (default: a temp dir)")
    p.add_argument(
        "--trust-key",
        action="append",
        metavar="PUBLIC_KEY",
        help="run only job specs signed by this controller key (repeat for several, e.g. during a key "
        "rotation; env TRAINFLEET_TRUST_KEY, comma-separated). Without one the agent warns and runs unsigned specs",
    )
    p.add_argument(
        "--trainer-user",
        metavar="USER",
        help="run trainers as this (unprivileged) user, not as the agent's (env TRAINFLEET_TRAINER_USER; the agent "
        "must be root or hold CAP_SETUID, CAP_SETGID and CAP_CHOWN; deploy/install.sh --trainer-user makes one)",
    )
    p.add_argument(
        "--no-torch-probe",
        action="store_true",
        help="skip the torch/CUDA cross-check subprocess (faster start; torch jobs still need torch)",
    )
    p.add_argument(
        "--log-file",
        metavar="PATH",
        help="also append the agent's log to this file (rotated at 10 MiB, 3 kept): where nothing keeps a "
        "service's output, as under a Windows Scheduled Task",
    )
    p.add_argument(
        "--stop-file",
        metavar="PATH",
        help="drain and stop when this file appears (env TRAINFLEET_STOP_FILE; on Windows, where nothing "
        "outside sends a SIGTERM, the default is WORKDIR/agent.stop: deploy/windows/stop-agent.ps1 creates it)",
    )


def _stop_before_serving(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM/SIGINT (Windows: SIGINT/SIGBREAK) while detecting: nothing is held yet, so just
    leave (exit 0)."""
    raise SystemExit(EXIT_OK)


def _log_to_file(path: Path) -> None:
    """Append every log record to ``path`` too, formatted as the console's."""
    root = logging.getLogger()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 << 20, backupCount=3, encoding="utf-8")
    console = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    handler.setFormatter(console or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def stop_file_path(
    flag: str | None, workdir: str | None, host_id: str, env: Mapping[str, str] | None = None
) -> Path | None:
    """The agent's stop file: ``--stop-file``, else ``$TRAINFLEET_STOP_FILE``, else on Windows
    WORKDIR/agent.stop (the temp dir's trainfleet-agent-HOST.stop without --workdir); on POSIX
    none unless asked for (SIGTERM is the way there)."""
    env = os.environ if env is None else env  # read, never copied or passed on
    if flag or env.get(STOP_FILE_ENV):
        return Path(flag or env[STOP_FILE_ENV])
    if not hostos.is_windows():
        return None
    if workdir:
        return Path(workdir) / STOP_FILE_NAME
    return Path(tempfile.gettempdir()) / f"trainfleet-agent-{host_id}.stop"


def cmd_agent(args: argparse.Namespace) -> int:
    from trainfleet.agent.capability import apply_overrides, default_host_id, detect, render_text

    host_id = default_host_id(args.host_id)
    health_file = Path(args.health_file) if args.health_file else health.default_path(args.workdir, host_id)
    if args.health:
        code, reason = health.check(health_file)
        print(reason)
        return code
    serving = not args.detect
    formatter = logfmt.use_json(host_id) if args.log_format == "json" and serving else None
    if serving and args.log_file:
        _log_to_file(Path(args.log_file))
    if serving:
        # As PID 1 (a container), an init stays in front: signals forwarded, orphans reaped.
        pid1.become_init()
        hostos.set_stop_handlers(_stop_before_serving)
    cap = detect(args.host_id, probe_torch=not args.no_torch_probe)
    cap = apply_overrides(cap, max_cores=args.max_cores, max_ram_gib=args.max_ram_gib, max_vram_gib=args.max_vram_gib)
    if args.detect:
        if args.json:
            print(json.dumps(msgspec.to_builtins(cap), indent=2, default=str, sort_keys=True))
        else:
            print(render_text(cap))
        return EXIT_OK
    from trainfleet.agent.agent import Agent, AgentOptions

    options = AgentOptions(
        host_id=cap.host_id,
        cpu_slots=args.cpu_slots,
        gpu_slots=args.gpu_slots,
        serve_cpu=not args.no_cpu,
        workdir=args.workdir,
        health_file=str(health_file),
        stop_file=str(stop_file) if (stop_file := stop_file_path(args.stop_file, args.workdir, cap.host_id)) else None,
    )
    settings = from_flags(args).with_(trainer_user=args.trainer_user)
    if settings.trainer_user:
        TrainerUser.lookup(settings.trainer_user)  # exits 2 now, not when the first job starts
    if args.trust_key:
        keys = tuple(k.strip() for arg in args.trust_key for k in arg.split(",") if k.strip())
        settings = settings.with_(trust_keys=keys)
    if formatter is not None:
        formatter.host = cap.host_id
    agent = Agent(settings, options, capability=cap)
    # From here a stop is a drain: the agent's own handlers take over once its loop runs.
    hostos.set_stop_handlers(lambda _signum, _frame: agent.request_stop())
    asyncio.run(agent.run())
    sys.stdout.flush()
    return EXIT_OK
