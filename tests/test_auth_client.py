"""Client credentials against a real nats-server: user/password, token, nkey seed, creds file,
nats CLI contexts; each accepted when right and refused at once, with a message naming the
problem, when wrong. Secrets never show in messages, logs or reprs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import nkeys
import pytest

from trainfleet.broker.connection import Broker, connect_nats
from trainfleet.broker.directget import DirectConnection, Endpoint
from trainfleet.broker.errors import DirectUnavailable, Unreachable
from trainfleet.broker.objstore import ObjectStoreClient
from trainfleet.broker.security import ClientSecurity, redact_url, resolve
from trainfleet.broker.server import EmbeddedServer, free_port
from trainfleet.broker.settings import Settings

PASSWORD = "s3cr3t-pa55"
TOKEN = "t0ken-value-42"
FAST_S = 3.0  # a refused login must fail at least this fast (nats-py alone retries forever)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Start a real nats-server with extra config text; every one is stopped at the end."""
    started: list[EmbeddedServer] = []

    def start(extra: str) -> EmbeddedServer:
        server = EmbeddedServer(tmp_path / f"nats-{len(started)}", extra_config=extra).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def refused(settings: Settings, **kwargs) -> str:
    """Connect, expecting Unreachable within FAST_S; its message."""
    began = time.monotonic()
    with pytest.raises(Unreachable) as caught:
        nc = await connect_nats(settings, **kwargs)
        await nc.close()
    assert time.monotonic() - began < FAST_S, "a hopeless connect must fail fast"
    return str(caught.value)


async def accepted(settings: Settings) -> None:
    nc = await connect_nats(settings)
    try:
        await nc.flush(timeout=2)
        assert nc.is_connected
    finally:
        await nc.close()


def new_seed(prefix: int) -> bytes:
    return nkeys.encode_seed(os.urandom(32), prefix)


def keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(new_seed(prefix)))


def with_url_user(url: str, userinfo: str) -> str:
    return url.replace("nats://", f"nats://{userinfo}@")


# -- user and password ------------------------------------------------------------
@pytest.fixture
def pw_server(serve) -> EmbeddedServer:
    return serve(f'authorization {{ users = [ {{user: "alice", password: "{PASSWORD}"}} ] }}')


async def test_user_and_password_are_accepted_and_a_wrong_password_is_refused_at_once(pw_server):
    await accepted(Settings(url=pw_server.url, user="alice", password=PASSWORD))
    message = await refused(Settings(url=pw_server.url, user="alice", password="wrong-" + PASSWORD))
    assert "authorization violation" in message and "user 'alice'" in message
    assert PASSWORD not in message


async def test_no_credentials_against_a_server_that_wants_them_says_so(pw_server):
    message = await refused(Settings(url=pw_server.url))
    assert "authorization violation" in message and "none were given" in message


async def test_user_and_password_in_the_url_work_and_never_show_in_a_refusal(pw_server, caplog):
    await accepted(Settings(url=with_url_user(pw_server.url, f"alice:{PASSWORD}")))
    caplog.set_level(logging.DEBUG)
    bad = f"alice:{PASSWORD}X"
    message = await refused(Settings(url=with_url_user(pw_server.url, bad)))
    assert "authorization violation" in message
    assert PASSWORD not in message and PASSWORD not in caplog.text
    assert f"at {pw_server.url}:" in message  # the URL, without its user info


async def test_an_unreachable_url_with_a_password_never_shows_it():
    url = f"nats://alice:{PASSWORD}@127.0.0.1:{free_port()}"
    message = await refused(Settings(url=url))
    assert "no server is listening" in message and PASSWORD not in message


def test_a_user_without_a_password_is_refused_before_connecting():
    with pytest.raises(Unreachable, match="a user needs a password"):
        resolve(Settings(user="alice")).check()


async def test_a_running_client_with_a_password_survives_a_server_restart(pw_server):
    # Given a connected client (credentials from settings)
    nc = await connect_nats(Settings(url=pw_server.url, user="alice", password=PASSWORD))
    try:
        # When the server restarts on the same port
        pw_server.restart()
        # Then the client reconnects by itself, with the same credentials
        for _ in range(100):
            if nc.is_connected and nc.stats["reconnects"] >= 1:
                break
            await asyncio.sleep(0.1)
        assert nc.stats["reconnects"] >= 1
        await nc.flush(timeout=2)
    finally:
        await nc.close()


async def test_a_waiting_process_waits_for_a_late_server_but_not_for_a_refused_login(serve, tmp_path):
    # Given a server that is not up yet, and a long-running process willing to wait 20 s
    late = EmbeddedServer(
        tmp_path / "late", extra_config=f'authorization {{ users = [ {{user: "alice", password: "{PASSWORD}"}} ] }}'
    )
    good = Settings(url=late.url, user="alice", password=PASSWORD)
    waiting = asyncio.create_task(connect_nats(good, wait_s=20.0))
    await asyncio.sleep(1.5)
    assert not waiting.done()
    # When the server comes up, it connects
    late.start()
    try:
        nc = await asyncio.wait_for(waiting, 15)
        await nc.close()
        # But a wrong password fails at once, however long it would wait
        message = await refused(good.with_(password="wrong"), wait_s=20.0)
        assert "authorization violation" in message
    finally:
        late.stop()


# -- token ----------------------------------------------------------------------------
async def test_a_token_is_accepted_from_settings_and_from_the_url_and_a_wrong_one_refused(serve):
    server = serve(f'authorization {{ token: "{TOKEN}" }}')
    await accepted(Settings(url=server.url, token=TOKEN))
    await accepted(Settings(url=with_url_user(server.url, TOKEN)))
    message = await refused(Settings(url=server.url, token="not-" + TOKEN))
    assert "authorization violation" in message and "a token" in message
    assert TOKEN not in message


# -- nkey seed file ---------------------------------------------------------------------
@pytest.fixture
def nkey_user(tmp_path: Path) -> tuple[Path, str]:
    seed = new_seed(nkeys.PREFIX_BYTE_USER)
    path = tmp_path / "user.nk"
    path.write_bytes(seed + b"\n")
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


async def test_an_nkey_seed_file_is_accepted_and_another_key_refused(serve, nkey_user, tmp_path):
    path, public = nkey_user
    server = serve(f'authorization {{ users = [ {{nkey: "{public}"}} ] }}')
    await accepted(Settings(url=server.url, nkey=str(path)))
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(new_seed(nkeys.PREFIX_BYTE_USER))
    message = await refused(Settings(url=server.url, nkey=str(stranger)))
    assert "authorization violation" in message and str(stranger) in message


async def test_a_missing_unreadable_or_malformed_nkey_file_is_named(serve, nkey_user, tmp_path):
    server = serve(f'authorization {{ users = [ {{nkey: "{nkey_user[1]}"}} ] }}')
    missing = tmp_path / "missing.nk"
    assert f"file not found: {missing}" in await refused(Settings(url=server.url, nkey=str(missing)))
    # A directory stands in for an unreadable file (the tests may run as root, who reads anything).
    assert f"cannot read {tmp_path}" in await refused(Settings(url=server.url, nkey=str(tmp_path)))
    garbage = tmp_path / "garbage.nk"
    garbage.write_text("SUNOTASEED\n")
    message = await refused(Settings(url=server.url, nkey=str(garbage)))
    assert f"not an nkey seed file: {garbage}" in message and "SUNOTASEED" not in message


# -- creds file (operator mode: hand-made operator, account and user JWTs) ---------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(issuer: nkeys.KeyPair, subject: str, nats: dict) -> str:
    """A NATS JWT (v2) for ``subject``, signed by ``issuer`` (ed25519-nkey)."""
    claims = {"jti": "", "iat": int(time.time()), "iss": issuer.public_key.decode(), "sub": subject, "name": "t"}
    claims["nats"] = {"version": 2, **nats}
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signing_input = (
        _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode()) + "." + _b64(json.dumps(claims).encode())
    )
    return signing_input + "." + _b64(issuer.sign(signing_input.encode()))


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1}


def creds_text(user_jwt: str, seed: bytes) -> str:
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )


class Operator:
    """An operator, its system account and one account, as nats-server config and creds files."""

    def __init__(self):
        self.op = keypair(nkeys.PREFIX_BYTE_OPERATOR)
        self.sys = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        self.acc = keypair(nkeys.PREFIX_BYTE_ACCOUNT)

    def account_jwt(self, account: nkeys.KeyPair) -> str:
        return make_jwt(self.op, account.public_key.decode(), {"type": "account", "limits": UNLIMITED})

    def config(self) -> str:
        op_jwt = make_jwt(self.op, self.op.public_key.decode(), {"type": "operator"})
        preload = ", ".join(f'{a.public_key.decode()}: "{self.account_jwt(a)}"' for a in (self.sys, self.acc))
        return (
            f'operator: "{op_jwt}"\nsystem_account: {self.sys.public_key.decode()}\n'
            f"resolver: MEMORY\nresolver_preload: {{ {preload} }}\n"
        )

    def user_creds(self, path: Path, signer: nkeys.KeyPair | None = None) -> Path:
        seed = new_seed(nkeys.PREFIX_BYTE_USER)
        user = nkeys.from_seed(bytearray(seed)).public_key.decode()
        claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        path.write_text(creds_text(make_jwt(signer or self.acc, user, claims), seed))
        return path


async def test_a_creds_file_is_accepted_and_one_from_an_unknown_account_refused(serve, tmp_path):
    operator = Operator()
    server = serve(operator.config())
    await accepted(Settings(url=server.url, creds=str(operator.user_creds(tmp_path / "u.creds"))))
    # A user signed by an account the operator never issued
    rogue = operator.user_creds(tmp_path / "rogue.creds", signer=keypair(nkeys.PREFIX_BYTE_ACCOUNT))
    message = await refused(Settings(url=server.url, creds=str(rogue)))
    assert "authorization violation" in message and str(rogue) in message


async def test_a_missing_or_malformed_creds_file_is_named_and_never_hangs(serve, tmp_path):
    server = serve(Operator().config())
    missing = tmp_path / "missing.creds"
    assert f"file not found: {missing}" in await refused(Settings(url=server.url, creds=str(missing)))
    # nats-py itself loops forever reading a creds file without a JWT block
    junk = tmp_path / "junk.creds"
    junk.write_text("just some text\n")
    assert f"not a NATS credentials file (no user JWT and seed blocks): {junk}" in await refused(
        Settings(url=server.url, creds=str(junk))
    )


# -- nats CLI contexts --------------------------------------------------------------------
def write_context(config_home: Path, name: str, **values: str) -> Path:
    """A context file as `nats context save` writes it: every key present, unset ones empty."""
    keys = ("description", "url", "token", "user", "password", "creds", "nkey", "cert", "key", "ca", "nsc")
    body = {k: "" for k in keys} | {"jetstream_domain": "", "inbox_prefix": "", "user_jwt": ""} | values
    path = config_home / "nats" / "context" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2))
    return path


async def test_a_context_by_name_supplies_url_and_credentials_and_flags_override_it(pw_server, tmp_path, monkeypatch):
    # Given a context "fleet" under $XDG_CONFIG_HOME with the URL, user and password
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    write_context(tmp_path / "config", "fleet", url=pw_server.url, user="alice", password=PASSWORD)
    # Then naming it is enough
    await accepted(Settings(context="fleet"))
    # And an explicit password overrides the context's
    message = await refused(Settings(context="fleet", password="wrong"))
    assert "authorization violation" in message and PASSWORD not in message


async def test_a_context_file_path_with_an_nkey_and_inbox_prefix(serve, nkey_user, tmp_path):
    path, public = nkey_user
    server = serve(f'authorization {{ users = [ {{nkey: "{public}"}} ] }}')
    ctx = write_context(tmp_path / "elsewhere", "agent", url=server.url, nkey=str(path), inbox_prefix="_INBOX_agent")
    nc = await connect_nats(Settings(context=str(ctx)))
    try:
        assert nc.new_inbox().startswith("_INBOX_agent.")
    finally:
        await nc.close()


async def test_a_missing_context_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    message = await refused(Settings(context="nope"))
    assert f"nats context 'nope': file not found: {tmp_path}/nats/context/nope.json" in message


def test_context_values_fill_only_what_settings_leave_unset(tmp_path):
    ctx = write_context(
        tmp_path, "c", url="nats://ctx:4222", creds="~/x.creds", ca="/ca.pem", cert="/c.pem", key="/k.pem"
    )
    # Explicit credentials replace the context's as a group; the CA and URL stay the context's
    sec = resolve(Settings(context=str(ctx), user="bob", password="pw", tls_cert="/mine.pem"))
    assert (sec.creds, sec.user, sec.tls_ca, sec.tls_cert, sec.tls_key) == (None, "bob", "/ca.pem", "/mine.pem", None)
    assert sec.servers == ("nats://ctx:4222",)
    assert resolve(Settings(context=str(ctx))).creds == str(Path("~/x.creds").expanduser())
    # An explicit URL wins over the context's
    assert resolve(Settings(context=str(ctx), url="nats://flag:4222")).servers == ("nats://flag:4222",)


def test_inbox_prefix_from_settings_goes_to_nats_connect():
    assert resolve(Settings(inbox_prefix="_INBOX_viewer")).connect_options()["inbox_prefix"] == "_INBOX_viewer"
    assert "inbox_prefix" not in resolve(Settings()).connect_options()


# -- redaction -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, shown",
    [
        ("nats://alice:pw@host:4222", "nats://host:4222"),
        ("nats://tok@host:4222", "nats://host:4222"),
        ("tls://a:p@s:w@h1:4222,nats://h2:4222", "tls://h1:4222,nats://h2:4222"),
        ("alice:pw@host:4222", "host:4222"),
        ("nats://host:4222", "nats://host:4222"),
    ],
)
def test_redact_url_drops_user_info(url, shown):
    assert redact_url(url) == shown


def test_reprs_hide_passwords_and_tokens():
    settings = Settings(user="alice", password=PASSWORD, token=TOKEN)
    security = resolve(settings.with_(url=f"nats://alice:{PASSWORD}@h:4222"))
    endpoint = Endpoint("h", 4222, "alice", PASSWORD, TOKEN)
    for obj in (settings, security, endpoint):
        assert PASSWORD not in repr(obj) and TOKEN not in repr(obj)
    assert "alice" in repr(security)


# -- the direct download path ------------------------------------------------------------------
async def test_the_direct_path_logs_in_as_an_nkey_client_did_and_a_bare_url_falls_back(serve, nkey_user):
    path, public = nkey_user
    server = serve(f'authorization {{ users = [ {{nkey: "{public}"}} ] }}')
    nc = await connect_nats(Settings(url=server.url, nkey=str(path)))
    try:
        # The client's own endpoint signs the server's nonce with the seed: accepted
        endpoint = Endpoint.for_client(nc)
        assert endpoint is not None and endpoint.nkey == str(path)
        DirectConnection(endpoint, idle_timeout_s=2).close()
        # The URL alone knows no key: refused cleanly, so the caller falls back
        bare = Endpoint.of(nc.connected_url)
        assert bare is not None
        with pytest.raises(DirectUnavailable, match="Authorization Violation"):
            DirectConnection(bare, idle_timeout_s=2)
    finally:
        await nc.close()


async def test_the_direct_path_logs_in_with_a_creds_file(serve, tmp_path):
    operator = Operator()
    server = serve(operator.config())
    nc = await connect_nats(Settings(url=server.url, creds=str(operator.user_creds(tmp_path / "u.creds"))))
    try:
        endpoint = Endpoint.for_client(nc)
        assert endpoint is not None
        DirectConnection(endpoint, idle_timeout_s=2).close()
    finally:
        await nc.close()


async def test_a_refused_direct_login_never_shows_the_password(pw_server):
    endpoint = Endpoint("127.0.0.1", pw_server.port, "alice", "wrong-" + PASSWORD)
    with pytest.raises(DirectUnavailable) as caught:
        DirectConnection(endpoint, idle_timeout_s=2)
    assert "Authorization Violation" in str(caught.value) and PASSWORD not in str(caught.value)


ROLE_PERMISSIONS = 'permissions: { publish: ["$JS.API.>", "$O.>"], subscribe: ["_INBOX_agent.>"] }'


async def test_the_direct_path_subscribes_under_the_clients_inbox_prefix_or_falls_back(serve, nkey_user):
    # Given a role that may subscribe only under its own inbox prefix
    path, public = nkey_user
    server = serve(f'authorization {{ users = [ {{nkey: "{public}", {ROLE_PERMISSIONS}}} ] }}')
    nc = await connect_nats(Settings(url=server.url, nkey=str(path), inbox_prefix="_INBOX_agent"))
    try:
        endpoint = Endpoint.for_client(nc)
        assert endpoint is not None and endpoint.inbox_prefix == "_INBOX_agent"
        DirectConnection(endpoint, idle_timeout_s=2).close()
        # A subscription elsewhere is refused in the handshake: the caller can still fall back
        with pytest.raises(DirectUnavailable, match="Permissions Violation"):
            DirectConnection(replace(endpoint, inbox_prefix="_INBOX"), idle_timeout_s=2)
    finally:
        await nc.close()


@pytest.mark.parametrize("direct", [True, False], ids=["as-the-client", "url-only"])
async def test_a_large_get_by_an_nkey_role_arrives_whole(serve, nkey_user, tmp_path, monkeypatch, caplog, direct):
    # Given a permission-restricted nkey role and an object big enough for the direct path
    from trainfleet.broker import objstore

    path, public = nkey_user
    server = serve(f'authorization {{ users = [ {{nkey: "{public}", {ROLE_PERMISSIONS}}} ] }}')
    nc = await connect_nats(Settings(url=server.url, nkey=str(path), inbox_prefix="_INBOX_agent"))
    if not direct:  # an endpoint made from the URL alone cannot log in: the get falls back
        monkeypatch.setattr(objstore.Endpoint, "for_client", staticmethod(lambda c: Endpoint.of(c.connected_url)))
    caplog.set_level(logging.INFO, logger="trainfleet.objstore")
    try:
        await nc.jetstream().create_object_store("auth-objs")
        store = ObjectStoreClient(nc, "auth-objs", chunk_bytes=64 * 1024, direct_min_bytes=0)
        data = os.urandom(300 * 1024)
        await store.put_bytes("obj", data)
        # When it is downloaded, it arrives whole: over the direct path as the client, else by the fallback
        await store.get_file("obj", tmp_path / "obj")
        assert (tmp_path / "obj").read_bytes() == data
        assert ("not possible" in caplog.text) == (not direct)
    finally:
        await nc.close()


def test_a_client_security_knows_when_tls_is_wanted():
    assert not ClientSecurity(servers=("nats://h:4222",)).wants_tls
    assert ClientSecurity(servers=("tls://h:4222",)).wants_tls
    assert ClientSecurity(servers=("nats://h:4222",), tls_ca="/ca.pem").wants_tls


async def test_broker_connect_reports_a_refused_login_as_unreachable(pw_server):
    with pytest.raises(Unreachable, match="authorization violation"):
        await Broker.connect(Settings(url=pw_server.url, user="alice", password="nope"))
