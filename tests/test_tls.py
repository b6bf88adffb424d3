"""TLS against a real nats-server with ``verify_and_map``, using the certificates
``trainfleet deploy certs`` writes: the right client certificate is accepted and mapped to its
user; a plaintext client, a certificate from another CA, an expired one, none at all, a server
certificate we cannot verify, a plaintext server: each refused at once, saying which."""

from __future__ import annotations

import datetime as dt
import gc
import json
import stat
import time
from asyncio import selector_events
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from trainfleet.broker.connection import connect_nats
from trainfleet.broker.directget import Endpoint
from trainfleet.broker.errors import Unreachable
from trainfleet.broker.server import EmbeddedServer
from trainfleet.broker.settings import Settings
from trainfleet.controller import certs
from trainfleet.controller.cli import main

FAST_S = 3.0
MAPPED = "agent"  # the only role the server below lists as a user


@pytest.fixture
def cert_set(tmp_path: Path) -> certs.CertSet:
    return certs.write_cert_set(tmp_path / "certs", roles=("agent", "viewer"))


@pytest.fixture
def tls_server(tmp_path: Path, cert_set: certs.CertSet) -> Iterator[EmbeddedServer]:
    """TLS required, client certificates verified and mapped; only the agent's DN is a user."""
    users = f'authorization {{ users = [ {{user: "{certs.mapped_user(MAPPED)}"}} ] }}\n'
    server = EmbeddedServer(tmp_path / "nats", extra_config=cert_set.tls_conf.read_text() + users).start()
    yield server
    server.stop()


def as_role(server: EmbeddedServer, cert_set: certs.CertSet, role: str, **changes: str) -> Settings:
    cert, key = cert_set.roles[role]
    return Settings(url=server.url, tls_ca=str(cert_set.ca), tls_cert=str(cert), tls_key=str(key)).with_(**changes)


async def refused(settings: Settings) -> str:
    began = time.monotonic()
    with pytest.raises(Unreachable) as caught:
        nc = await connect_nats(settings)
        await nc.close()
    assert time.monotonic() - began < FAST_S, "a hopeless TLS connect must fail fast"
    return str(caught.value)


def write_leaf(directory: Path, name: str, issued: certs.Issued) -> tuple[str, str]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    certs.write_issued(issued, cert, key)
    return str(cert), str(key)


# -- accepted and mapped -----------------------------------------------------------------
async def test_the_right_client_certificate_is_accepted_and_mapped_to_its_user(tls_server, cert_set):
    nc = await connect_nats(as_role(tls_server, cert_set, MAPPED))
    try:
        # The server says who we are: the user entry named by the certificate's subject DN
        reply = await nc.request("$SYS.REQ.USER.INFO", b"", timeout=5)
        assert json.loads(reply.data)["data"]["user"] == "CN=trainfleet-agent" == certs.mapped_user(MAPPED)
    finally:
        await nc.close()


async def test_a_valid_certificate_of_a_role_the_server_does_not_list_is_refused(tls_server, cert_set):
    message = await refused(as_role(tls_server, cert_set, "viewer"))
    assert "authorization violation" in message and "viewer.pem" in message


def open_transports_to(port: int) -> list[object]:
    """This process's socket transports to ``port`` that nobody closed."""
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, selector_events._SelectorSocketTransport)
        and not o.is_closing()
        and (o.get_extra_info("peername") or ("", 0))[1] == port
    ]


async def test_a_refused_connect_leaves_no_socket_open(tls_server, cert_set):
    # nats-py is stopped in the middle of its own close (a refusal ends our first connect at
    # once): what it opened must be closed anyway, not left for the collector to find in some
    # later test (CI, twice: "unclosed transport" failing an unrelated test). The race is
    # rare: without the fix in _abandon this failed 1 run in 8.
    for _ in range(30):
        await refused(as_role(tls_server, cert_set, "viewer"))
    gc.collect()  # a writer dropped unclosed warns now, in this test
    assert open_transports_to(tls_server.port) == []


async def test_a_context_with_ca_cert_and_key_connects(tls_server, cert_set, tmp_path):
    cert, key = cert_set.roles[MAPPED]
    ctx = tmp_path / "tls.json"
    ctx.write_text(json.dumps({"url": tls_server.url, "ca": str(cert_set.ca), "cert": str(cert), "key": str(key)}))
    nc = await connect_nats(Settings(context=str(ctx)))
    await nc.close()


# -- refused, saying why -----------------------------------------------------------------
async def test_a_plaintext_client_is_told_the_server_requires_tls(tls_server):
    message = await refused(Settings(url=tls_server.url))
    assert "server requires TLS" in message


async def test_a_client_certificate_from_another_ca_is_refused(tls_server, cert_set, tmp_path):
    cert, key = write_leaf(tmp_path, "forged", certs.issue(certs.new_ca(), certs.role_cn(MAPPED)))
    message = await refused(as_role(tls_server, cert_set, MAPPED, tls_cert=cert, tls_key=key))
    assert "the server rejected client certificate" in message and "unknown ca" in message


async def test_an_expired_client_certificate_is_refused(tls_server, cert_set, tmp_path):
    ca = certs.load_issued(cert_set.ca, cert_set.ca_key)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert, key = write_leaf(tmp_path, "expired", certs.issue(ca, certs.role_cn(MAPPED), days=1, valid_from=long_ago))
    message = await refused(as_role(tls_server, cert_set, MAPPED, tls_cert=cert, tls_key=key))
    assert "certificate expired" in message


async def test_no_client_certificate_is_refused(tls_server, cert_set):
    message = await refused(Settings(url=tls_server.url, tls_ca=str(cert_set.ca)))
    assert "requires a client certificate" in message


async def test_a_server_certificate_from_another_ca_fails_verification(tls_server, cert_set, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    certs.write_issued(certs.new_ca(), other_ca, tmp_path / "other-ca-key.pem")
    message = await refused(as_role(tls_server, cert_set, MAPPED, tls_ca=str(other_ca)))
    assert "certificate verify failed" in message


async def test_a_tls_url_alone_means_tls(tls_server):
    # No CA given: the system's CAs do not know ours, so verification (i.e. TLS) is what fails
    message = await refused(Settings(url=tls_server.url.replace("nats://", "tls://")))
    assert "certificate verify failed" in message


async def test_tls_against_a_plaintext_server_is_refused_not_downgraded(tmp_path, cert_set):
    server = EmbeddedServer(tmp_path / "plain").start()
    try:
        message = await refused(Settings(url=server.url, tls_ca=str(cert_set.ca)))
        assert "does not require TLS" in message
    finally:
        server.stop()


async def test_a_missing_certificate_file_is_named(tls_server, cert_set, tmp_path):
    missing = tmp_path / "nope.pem"
    message = await refused(as_role(tls_server, cert_set, MAPPED, tls_cert=str(missing)))
    assert f"file not found: {missing}" in message


async def test_the_direct_download_path_is_never_used_by_a_tls_client(tls_server, cert_set):
    nc = await connect_nats(as_role(tls_server, cert_set, MAPPED))
    try:
        assert Endpoint.for_client(nc) is None
    finally:
        await nc.close()


# -- trainfleet deploy certs -----------------------------------------------------------------
def test_deploy_certs_writes_ca_server_and_role_certificates(tmp_path, capsys):
    out = tmp_path / "pki"
    assert main(["deploy", "certs", str(out), "--hosts", "nats.example,10.1.2.3", "--roles", "agent,viewer"]) == 0
    assert "CN=trainfleet-agent" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    keys = {"ca-key.pem", "server-key.pem", "agent-key.pem", "viewer-key.pem"}
    assert names == keys | {"ca.pem", "server.pem", "agent.pem", "viewer.pem", "tls.conf"}
    for name in keys:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert sans.get_values_for_type(x509.DNSName) == ["nats.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    agent = x509.load_pem_x509_certificate((out / "agent.pem").read_bytes())
    assert agent.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "trainfleet-agent"
    assert agent.subject.rfc4514_string() == certs.mapped_user("agent")
    conf = (out / "tls.conf").read_text()
    assert f'ca_file: "{out / "ca.pem"}"' in conf and "verify_and_map: true" in conf


def test_deploy_certs_defaults_and_keeps_an_existing_ca(tmp_path):
    first = certs.write_cert_set(tmp_path, days=10)
    assert set(first.roles) == set(certs.DEFAULT_ROLES) and not first.ca_reused
    server = x509.load_pem_x509_certificate(first.server.read_bytes())
    sans = server.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days == 10
    ca_before = first.ca.read_bytes()
    again = certs.write_cert_set(tmp_path, roles=("agent",))
    assert again.ca_reused and again.ca.read_bytes() == ca_before


def test_deploy_certs_refuses_a_role_name_that_is_not_a_plain_word(tmp_path):
    assert main(["deploy", "certs", str(tmp_path), "--roles", "../evil"]) == 2
    assert not (tmp_path / "ca.pem").exists()
