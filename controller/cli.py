"""The ``trainfleet`` command: parse the command line and dispatch each verb.

Writes (sync, reload, cancel, requeue) are requests to the control service
(broker/control.py), exactly like ``nats req trainfleet.ctl.<verb>``. Reads
(status, jobs, show, workers, logs, artifacts) go straight to the KV buckets,
the logs stream and the object store (ops.py), so they work while no controller
runs. What each verb prints is view.py; the agent verb is agent/cli.py.

Exit codes come from the error classes (broker/errors.py lists them): 0 ok ·
1 jobs failed / no host can run it / operation refused · 2 bad usage or invalid
manifest · 3 NATS unreachable, not provisioned, JetStream unavailable past an
election's patience, a storage limit reached, or no controller answering ·
4 job not found or ambiguous · 5 artifact missing, corrupt or unsafe. Every
listing has --json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from trainfleet.agent import cli as agent_cli
from trainfleet.broker.connection import Broker
from trainfleet.broker.control import request
from trainfleet.broker.errors import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ManifestError,
    Refused,
    TrainfleetError,
    Unsatisfied,
    UsageError,
)
from trainfleet.broker.jobs import resolve
from trainfleet.broker.logs import read_logs
from trainfleet.broker.retry import CLI_PATIENCE_S, patiently
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.security import redact_url
from trainfleet.broker.settings import from_flags
from trainfleet.broker.workers import load_workers, stale_after_s
from trainfleet.controller import explain, ops, view
from trainfleet.controller.manifest import load_manifest


def _run(args: argparse.Namespace, fn: Callable[[Broker], Awaitable[Any]]) -> Any:
    """Connect, run ``fn`` with the broker, close; ``fn``'s result."""

    async def with_broker() -> Any:
        broker = await Broker.connect(from_flags(args), name="trainfleet-cli")
        try:
            # An election meanwhile is waited out (reads are idempotent); control requests are not
            # retried (NoController is no election).
            return await patiently(lambda: fn(broker), what=f"trainfleet {args.verb}", limit_s=CLI_PATIENCE_S)
        finally:
            await broker.close()

    return asyncio.run(with_broker())


def _control(args: argparse.Namespace, verb: str, body: dict[str, Any] | None = None) -> Any:
    """One request to the control service; its result, or the controller's error raised."""
    return _run(args, lambda broker: request(broker.nc, broker.names, verb, body))


# -- running a fleet ------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from trainfleet.controller.up import run_up

    return run_up(args, from_flags(args))


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        view.manifest_problems(args.manifest, exc.problems, args.json)
        return exc.exit_code
    view.show({"ok": True, **manifest.to_json()}, args.json, lambda _: view.manifest_jobs(args.manifest, manifest))
    return EXIT_OK


def cmd_controller(args: argparse.Namespace) -> int:
    from trainfleet.controller.controller import Controller

    settings = from_flags(args).with_(signing_key=args.signing_key)
    asyncio.run(Controller(settings, manifest_path=args.manifest).run())
    return EXIT_OK


def cmd_provision(args: argparse.Namespace) -> int:
    """Create or update every resource. The configured sizes are checked against the account's
    storage limits first, and a storage refusal names the resource, the limit and the fix
    (StorageLimit, exit 3); any other refusal of the server is a BrokerError naming it too."""
    import nats.js.errors

    from trainfleet.broker.errors import BrokerError
    from trainfleet.broker.provision import size_text

    settings = from_flags(args)

    async def provision() -> Broker:
        try:
            broker = await Broker.connect(settings, name="trainfleet-cli", provision=True)
        except nats.js.errors.APIError as exc:
            raise BrokerError(
                f"provisioning on {redact_url(settings.url)} was refused: {exc.description or exc!r} "
                f"(err_code {exc.err_code})"
            ) from exc
        await broker.close()
        return broker

    broker = asyncio.run(provision())
    print(
        f"provisioned trainfleet resources (prefix {broker.settings.prefix}) on {redact_url(broker.settings.url)}; "
        f"the logs stream {broker.names.logs_stream} keeps up to {size_text(settings.logs_max_bytes)} "
        "(TRAINFLEET_LOGS_MAX_BYTES)"
    )
    return EXIT_OK


# -- control (through a controller) ------------------------------------------------
def cmd_sync(args: argparse.Namespace) -> int:
    path = Path(args.manifest)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    body = {"manifest": text, "file": str(path.resolve()), "allow_command_change": args.allow_command_change}
    return _print_sync(args, _control(args, "sync", body))


def cmd_reload(args: argparse.Namespace) -> int:
    return _print_sync(args, _control(args, "reload", {"allow_command_change": args.allow_command_change}))


def _print_sync(args: argparse.Namespace, report: dict[str, Any]) -> int:
    """A refused command change is not a success: exit 1 so scripts notice."""
    view.show(report, args.json, view.sync_report)
    return Refused.exit_code if report.get("refused") else EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    rec = _control(args, "cancel", {"job": args.job})
    view.show(rec, args.json, lambda r: f"cancelled {r['spec']['name']} ({r['job_id'][:12]})")
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    rec = _control(args, "requeue", {"job": args.job})
    text = lambda r: f"requeued {r['spec']['name']} ({r['job_id'][:12]}) as generation {r['generation']}"  # noqa: E731
    view.show(rec, args.json, text)
    return EXIT_OK


# -- reading (straight from NATS) ----------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    view.show(_run(args, ops.fleet_status), args.json, view.fleet_status)
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    rows = _run(args, lambda broker: ops.list_jobs(broker, state=args.state, model=args.model, host=args.host))
    view.show(rows, args.json, lambda r: view.jobs_table(r, filtered=bool(args.state or args.model or args.host)))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    data = _run(args, lambda broker: ops.job_detail(broker, args.job, provenance=not args.no_provenance))
    view.show(data, args.json, view.job_detail)
    return EXIT_OK


def cmd_workers(args: argparse.Namespace) -> int:
    view.show(_run(args, ops.list_workers), args.json, view.workers_table)
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    from trainfleet.controller import health

    settings = from_flags(args)
    report = asyncio.run(health.check_within(settings, args.timeout_s, max_pending_age_s=args.max_pending_age))
    view.show(report, args.json, health.render)
    return int(report["exit_code"])


def cmd_explain(args: argparse.Namespace) -> int:
    rec, matches = _run(
        args, lambda broker: explain.explain_ref(broker, args.job, stale_after_s=stale_after_s(broker.settings))
    )
    view.show(explain.explain_json(rec, matches), args.json, lambda _: view.render_explain(rec, matches))
    return EXIT_OK if any(m.eligible and m.alive for m in matches) else Unsatisfied.exit_code


def cmd_plan(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    plans = explain.plan_manifest(manifest, _run(args, load_workers))
    view.show([p.to_dict() for p in plans], args.json, lambda _: view.render_plan(plans))
    return Unsatisfied.exit_code if args.check and not all(p.runnable for p in plans) else EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    printer = view.LogPrinter(args.json)

    async def follow(broker: Broker) -> None:
        job_id = (await resolve(broker, args.job)).record.job_id
        reader = read_logs(broker, job_id, follow=args.follow, events=args.events, attempt=args.attempt)
        async with contextlib.aclosing(reader) as entries:
            async for entry in entries:
                printer.entry(entry)

    _run(args, follow)
    return EXIT_OK


def cmd_artifacts_list(args: argparse.Namespace) -> int:
    view.show(_run(args, ops.list_artifacts), args.json, view.artifacts_table)
    return EXIT_OK


def cmd_artifacts_get(args: argparse.Namespace) -> int:
    result = _run(
        args,
        lambda broker: ops.fetch_artifact(broker, args.job, Path(args.out), extract=args.extract, force=args.force),
    )
    view.show(result, args.json, view.artifact_fetched)
    return EXIT_OK


def cmd_artifacts_sweep(args: argparse.Namespace) -> int:
    result = _run(args, lambda broker: ops.sweep_artifacts(broker, args.older_than, dry_run=args.dry_run))
    view.show(result, args.json, view.sweep_report)
    return EXIT_OK


def cmd_artifacts_prune(args: argparse.Namespace) -> int:
    if args.older_than is not None and args.older_than < 0:
        raise UsageError(f"--older-than must be 0 or more seconds, not {args.older_than:g}")
    result = _run(args, lambda broker: ops.prune_artifacts(broker, args.older_than, dry_run=args.dry_run))
    view.show(result, args.json, view.prune_report)
    return EXIT_OK


def cmd_monitor(args: argparse.Namespace) -> int:
    if args.web:
        from trainfleet.tui.web import serve_monitor

        return serve_monitor(from_flags(args), args.host, args.port)
    if args.host is not None or args.port is not None:
        raise UsageError("--host and --port go with --web")
    from trainfleet.tui.app import run_monitor

    return run_monitor(from_flags(args))


def cmd_auth_init(args: argparse.Namespace) -> int:
    from trainfleet.controller.auth import init_auth

    hosts = [h.strip() for h in (args.agent_host or "").split(",") if h.strip()]
    files = init_auth(args.dir, from_flags(args).names, agent_hosts=hosts, url=args.url, rotate=args.rotate)
    result = {
        "dir": str(files.directory),
        "server_include": str(files.server_include),
        "signing_public_key": files.signing_public_key,
        "identities": {
            i.name: {
                "role": i.role,
                "public_key": i.public_key,
                "seed": str(files.seed_path(i.name)),
                "env": str(files.env_path(i.name)),
            }
            for i in files.identities
        },
    }
    view.show(result, args.json, view.auth_files)
    return EXIT_OK


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    from trainfleet.controller import certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    written = certs.write_cert_set(args.dir, hosts=hosts, roles=roles, days=args.days)
    data = {
        "directory": str(written.directory),
        "ca": str(written.ca),
        "ca_reused": written.ca_reused,
        "server": [str(written.server), str(written.server_key)],
        "tls_conf": str(written.tls_conf),
        "roles": {
            role: {"cert": str(c), "key": str(k), "user": certs.mapped_user(role)}
            for role, (c, k) in written.roles.items()
        },
    }

    def text(d: dict[str, Any]) -> str:
        lines = [f"{'reused' if d['ca_reused'] else 'wrote'} CA {d['ca']}", f"wrote server cert {d['server'][0]}"]
        lines += [
            f"wrote {role} cert {r['cert']}  (verify_and_map user {r['user']!r})" for role, r in d["roles"].items()
        ]
        lines.append(f"wrote {d['tls_conf']}: include it from nats-server.conf (private keys are mode 0600)")
        return "\n".join(lines)

    view.show(data, args.json, text)
    return EXIT_OK


# -- parser ------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="NATS URL(s), comma-separated (env NATS_URL; default nats://127.0.0.1:4222)")
    p.add_argument("--prefix", help="resource name prefix (env TRAINFLEET_PREFIX; default trainfleet)")
    p.add_argument("--lease-s", type=float, help="job lease = consumer ack-wait, seconds (default 120)")
    p.add_argument("--heartbeat-s", type=float, help="lease renewal interval, seconds (default 30; <= lease/3)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    auth = p.add_argument_group("connection security (docs/security.md)")
    auth.add_argument("--creds", help="NATS credentials file, user JWT + seed (env NATS_CREDS)")
    auth.add_argument("--nkey", help="nkey seed file (env NATS_NKEY)")
    auth.add_argument("--user", help="user name (env NATS_USER)")
    auth.add_argument("--password", help="password (env NATS_PASSWORD; prefer the env var: argv is visible to ps)")
    auth.add_argument("--token", help="auth token (env NATS_TOKEN)")
    auth.add_argument("--tls-ca", help="CA certificate that signed the server's (env NATS_CA)")
    auth.add_argument("--tls-cert", help="client certificate for mTLS (env NATS_CERT)")
    auth.add_argument("--tls-key", help="client certificate's key (env NATS_KEY)")
    auth.add_argument("--context", help="nats CLI context name or file to take all of these from (env NATS_CONTEXT)")
    auth.add_argument(
        "--inbox-prefix", help="reply inbox prefix of this role, e.g. _INBOX_operator (env TRAINFLEET_INBOX_PREFIX)"
    )


def _command_change_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-command-change",
        action="store_true",
        help="apply a changed command (or requires) to existing jobs; without it such jobs keep theirs "
        "and are listed as refused (exit 1)",
    )


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


JOB_HELP = "job name, full id, or unique id prefix (4+ characters)"
EPILOG = EXIT_CODES_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainfleet",
        description="Train every model in a manifest at most once, across a fleet of "
        "unlike machines, over NATS JetStream.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        name: str, fn: Callable[[argparse.Namespace], int], help: str, parent: Any = sub, aliases: tuple[str, ...] = ()
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, epilog=EPILOG, aliases=list(aliases))
        _common(p)
        p.set_defaults(fn=fn)
        return p

    # -- running a fleet --
    p = verb(
        "up",
        cmd_up,
        "run a whole local fleet (embedded nats-server, controller, agents) on a manifest "
        "and show progress until every job is done",
    )
    p.add_argument("manifest")
    p.add_argument("--agents", type=int, default=2, help="local agents to start (default 2)")
    p.add_argument("--keep", action="store_true", help="leave the fleet running after the jobs finish")
    p.add_argument("--data-dir", help="where the embedded server and agents keep state (default .trainfleet/up-<time>)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up after this long (default 1800)")
    p.add_argument("--no-live", action="store_true", help="print progress lines instead of a live table")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.add_argument(
        "--auth-dir",
        help="with --url: give the controller and agents their own roles' identities from this `auth init` "
        "directory (made if missing); the embedded server always makes its own per run",
    )

    p = verb("validate", cmd_validate, "check a manifest and list its jobs with ids (exit 2 on errors)")
    p.add_argument("manifest")
    _json_flag(p)

    p = verb("controller", cmd_controller, "run a controller (publishes tickets, reconciles, serves control)")
    p.add_argument("--manifest", help="sync this manifest at start; `reload` re-reads it")
    p.add_argument(
        "--signing-key",
        metavar="SEED_FILE",
        help="nkey seed the controller signs job specs with (env TRAINFLEET_SIGNING_KEY; `trainfleet auth init` "
        "makes one); agents trust its public key",
    )

    p = verb("agent", agent_cli.cmd_agent, agent_cli.HELP)
    agent_cli.add_arguments(p)

    verb("provision", cmd_provision, "create or update every stream, bucket and object store (idempotent)")

    # -- control (through the trainfleet micro service: a controller must be running) --
    p = verb("sync", cmd_sync, "send a manifest to the controller (idempotent: existing jobs keep their state)")
    p.add_argument("manifest")
    _command_change_flag(p)
    _json_flag(p)
    p = verb("reload", cmd_reload, "make the controller re-read its --manifest file")
    _command_change_flag(p)
    _json_flag(p)
    p = verb("cancel", cmd_cancel, "cancel a job (a running trainer is stopped by its agent)")
    p.add_argument("job", help=JOB_HELP)
    _json_flag(p)
    p = verb("requeue", cmd_requeue, "put a failed, cancelled or completed job back to pending")
    p.add_argument("job", help=JOB_HELP)
    _json_flag(p)

    # -- reading (straight from the KV, stream and object store: works without a controller) --
    p = verb("status", cmd_status, "job counts by state and workers alive/stale")
    _json_flag(p)
    p = verb("jobs", cmd_jobs, "list jobs, highest priority first (alias: list)", aliases=("list",))
    p.add_argument("--state", choices=[s.value for s in JobStatus], help="only jobs in this state")
    p.add_argument("--model", help="only jobs of this model")
    p.add_argument("--host", help="only jobs claimed by this host")
    _json_flag(p)
    p = verb("show", cmd_show, "one job: spec, record, state history, last error, artifact and provenance")
    p.add_argument("job", help=JOB_HELP)
    p.add_argument("--no-provenance", action="store_true", help="skip reading provenance from the bundle")
    _json_flag(p)
    p = verb("workers", cmd_workers, "registered agents, their capability and current jobs")
    _json_flag(p)
    p = verb(
        "health",
        cmd_health,
        "is the fleet healthy: server, streams and buckets, a controller answering, agents alive, backlog "
        "(exit 0 healthy, 1 degraded, 3 unreachable; a container or systemd probe)",
    )
    p.add_argument("--timeout-s", type=float, default=10.0, help="give up after this long (default 10)")
    p.add_argument(
        "--max-pending-age",
        type=float,
        metavar="SECONDS",
        help="also degraded when the oldest pending job has waited longer than this",
    )
    _json_flag(p)
    p = verb("logs", cmd_logs, "a job's trainer output (stdout, and stderr on stderr) from the logs stream")
    p.add_argument("job", help=JOB_HELP)
    p.add_argument("-f", "--follow", action="store_true", help="keep following until the job is terminal")
    p.add_argument("--attempt", type=int, help="only this attempt's output")
    p.add_argument("--events", action="store_true", help="interleave progress and lifecycle events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser(
        "artifacts",
        help="list artifacts, or download one verified by sha256",
        description="list artifacts, or download one verified by sha256",
        epilog=EPILOG,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = verb(
        "list",
        cmd_artifacts_list,
        "jobs with artifacts, and stored bundles no record points at (orphans)",
        parent=actions,
    )
    _json_flag(p)
    p = verb(
        "get", cmd_artifacts_get, "download a job's bundle (verified by sha256), optionally extract it", parent=actions
    )
    p.add_argument("job", help=JOB_HELP + "; or a stored artifact's full sha256")
    p.add_argument("--out", default=".", help="directory to write the bundle into (default .)")
    p.add_argument(
        "--extract",
        action="store_true",
        help="also extract it into the new directory OUT/<job id> (refusing unsafe members and oversized bundles)",
    )
    p.add_argument("--force", action="store_true", help="with --extract: replace an existing, non-empty OUT/<job id>")
    _json_flag(p)

    p = verb(
        "sweep",
        cmd_artifacts_sweep,
        "purge stray chunks: what an upload cut off mid-way leaves in the object "
        "store (the controller also does this every artifact_sweep_s)",
        parent=actions,
    )
    p.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="only chunk sets whose newest chunk is at least this old (default stray_chunk_age_s, "
        "3600: an upload still under way is never touched)",
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be purged")
    _json_flag(p)

    p = verb(
        "prune",
        cmd_artifacts_prune,
        "remove stored bundles no job record points at (a requeued job's earlier bundle); needs the "
        "controller's or the admin's credentials (the controller also does this every artifact_prune_s, when set)",
        parent=actions,
    )
    p.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="only bundles stored at least this long ago (default artifact_prune_age_s, 3600: an upload "
        "whose job record is not written yet is never touched)",
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    _json_flag(p)

    p = verb(
        "monitor",
        cmd_monitor,
        "live terminal monitor: jobs, workers, logs, job and worker detail (? keys, / filter, Enter detail, q quit)",
    )
    p.add_argument(
        "--web",
        action="store_true",
        help="serve the monitor to a browser instead (textual-serve; each tab runs its own monitor with "
        "these settings); anyone who can reach the port gets this identity's rights",
    )
    p.add_argument("--host", help="with --web: address to listen on (default 127.0.0.1; wider warns)")
    p.add_argument("--port", type=int, help="with --web: port to listen on (default 8000)")

    p = verb(
        "explain",
        cmd_explain,
        "for every registered worker: can it run JOB, and if not exactly which "
        "constraint fails (exit 0 when a live worker can run it now, 1 when none can)",
    )
    p.add_argument("job", help=JOB_HELP)
    _json_flag(p)
    p = verb(
        "plan",
        cmd_plan,
        "before syncing: which registered hosts could ever take each job of MANIFEST, "
        "with a warning for every job none can",
    )
    p.add_argument("manifest")
    p.add_argument("--check", action="store_true", help="exit 1 when some job can never run")
    _json_flag(p)

    # -- moving from the predecessor (controller/importer.py, docs/migrating.md) --
    from trainfleet.controller import importer

    p = verb("import", importer.cmd_import, importer.HELP)
    importer.add_arguments(p)

    p = sub.add_parser(
        "auth",
        help="make the identities and permissions of a secured fleet",
        description="make the identities and permissions of a secured fleet",
        epilog=EPILOG,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = verb(
        "init",
        cmd_auth_init,
        "write into DIR an nkey per role (admin, controller, operator, agent, viewer), "
        "auth.conf (the nats-server permissions of each, no anonymous user), the controller's spec-signing "
        "key, and an env file and nats context per identity; existing keys are kept",
        parent=actions,
    )
    p.add_argument("dir", help="directory to write into (created mode 0700)")
    p.add_argument(
        "--agent-host",
        metavar="HOSTS",
        help="also make one agent identity per host (comma-separated) that may write only its own worker entry",
    )
    p.add_argument(
        "--rotate", action="store_true", help="replace every existing key (running clients must get the new ones)"
    )
    _json_flag(p)

    p = sub.add_parser(
        "deploy",
        help="make what a secured deployment needs (TLS certificates)",
        description="make what a secured deployment needs (TLS certificates)",
        epilog=EPILOG,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "certs",
        help="write a CA, a server certificate and one client certificate per role, plus tls.conf",
        description="write into DIR a CA (ca.pem, reused if DIR has one), a server certificate for --hosts, "
        "one client certificate per role (subject CN=trainfleet-<role>, the user nats-server's "
        "verify_and_map maps it to) and tls.conf, a nats-server include; keys are mode 0600",
        epilog=EPILOG,
    )
    p.add_argument("dir", help="directory to write into (created if missing)")
    p.add_argument("--hosts", default="localhost,127.0.0.1", help="server hostnames/IPs, comma-separated (SANs)")
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.add_argument(
        "--roles", default="admin,controller,operator,agent,viewer", help="client certificates to make, comma-separated"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    _json_flag(p)
    p.set_defaults(fn=cmd_deploy_certs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.verb in ("controller", "agent") and not args.verbose:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.fn(args) or 0)
    except TrainfleetError as exc:
        print(f"trainfleet: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"trainfleet: {exc}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `trainfleet logs JOB | head`: the reader left; nothing more to say.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
