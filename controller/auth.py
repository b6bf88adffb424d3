"""``trainfleet auth init DIR``: an identity per role, the server's permission blocks, and the
controller's spec-signing key, as files an operator installs.

Writes into DIR (files with secrets are mode 0600; DIR itself 0700):

* ``<name>.nk``: the nkey seed of each identity (admin, controller, operator, agent, viewer,
  and ``agent-<host>`` for each ``--agent-host``);
* ``auth.conf``: the nats-server ``authorization`` block (include it from the server config);
* ``auth-mtls.conf``: the same permissions for clients that log in with a certificate under
  ``verify_and_map`` (user = the certificate's subject, ``CN=trainfleet-<name>``, as
  ``trainfleet deploy certs`` makes them);
* ``signing.nk`` / ``signing.pub``: the controller's spec-signing seed and its public key;
* ``<name>.env``: what a process of that identity needs in its environment (NATS_NKEY,
  TRAINFLEET_INBOX_PREFIX, and TRAINFLEET_SIGNING_KEY or TRAINFLEET_TRUST_KEY);
* ``context/<name>.json``: the same as a nats CLI context (``nats --context``).

Seeds that exist are kept (so running it again to add an agent host changes no other
identity); ``--rotate`` replaces them all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from trainfleet.broker import roles
from trainfleet.broker.errors import UsageError
from trainfleet.broker.names import HOST_ID_RULE, Names, is_host_id
from trainfleet.broker.specs import new_seed, public_key_of, write_seed
from trainfleet.controller.certs import mapped_user

SIGNING_NAME = "signing"


@dataclass
class AuthFiles:
    """What `auth init` wrote: where, and every identity's public key."""

    directory: Path
    identities: list[roles.Identity] = field(default_factory=list)
    signing_public_key: str = ""

    def seed_path(self, name: str) -> Path:
        return self.directory / f"{name}.nk"

    def env_path(self, name: str) -> Path:
        return self.directory / f"{name}.env"

    @property
    def server_include(self) -> Path:
        return self.directory / "auth.conf"

    @property
    def mtls_include(self) -> Path:
        return self.directory / "auth-mtls.conf"

    def role_env(self, name: str) -> dict[str, str]:
        """The environment of a process running as identity ``name``."""
        identity = next(i for i in self.identities if i.name == name)
        env = {"NATS_NKEY": str(self.seed_path(name)), "TRAINFLEET_INBOX_PREFIX": roles.inbox_prefix(identity.role)}
        if identity.role == "controller":
            env["TRAINFLEET_SIGNING_KEY"] = str(self.seed_path(SIGNING_NAME))
        if identity.role == "agent":
            env["TRAINFLEET_TRUST_KEY"] = self.signing_public_key
        return env


def _secret_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _seed(path: Path, rotate: bool) -> str:
    """The public key of the seed at ``path``, made (or remade, with ``rotate``) when needed."""
    if path.exists() and not rotate:
        return public_key_of(path.read_bytes())
    return write_seed(path, new_seed())


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def init_auth(
    directory: str | os.PathLike[str],
    names: Names,
    *,
    agent_hosts: list[str] | None = None,
    url: str | None = None,
    rotate: bool = False,
) -> AuthFiles:
    """Write (or complete) the auth files of one fleet into ``directory``; see the module doc."""
    out = AuthFiles(Path(directory).resolve())
    for host in agent_hosts or []:
        if not is_host_id(host):
            raise UsageError(f"agent host {host!r} is not a valid host id: it {HOST_ID_RULE}")
    _secret_dir(out.directory)
    wanted = [roles.Identity(role, "") for role in roles.ROLES]
    wanted += [roles.Identity("agent", "", host) for host in agent_hosts or []]
    for identity in wanted:
        public = _seed(out.seed_path(identity.name), rotate)
        out.identities.append(roles.Identity(identity.role, public, identity.host_id))
    out.signing_public_key = _seed(out.seed_path(SIGNING_NAME), rotate)
    (out.directory / f"{SIGNING_NAME}.pub").write_text(out.signing_public_key + "\n")
    _write_private(out.server_include, roles.authorization_config(out.identities, names))
    by_certificate = [roles.Identity(i.role, mapped_user(i.name), i.host_id) for i in out.identities]
    _write_private(out.mtls_include, roles.authorization_config(by_certificate, names, key_field="user"))
    context_dir = out.directory / "context"
    _secret_dir(context_dir)
    for identity in out.identities:
        env = out.role_env(identity.name)
        _write_private(out.env_path(identity.name), "".join(f"{k}={v}\n" for k, v in env.items()))
        context = {
            "description": f"trainfleet {identity.name}",
            "nkey": env["NATS_NKEY"],
            "inbox_prefix": env["TRAINFLEET_INBOX_PREFIX"],
        }
        if url:
            context["url"] = url
        _write_private(context_dir / f"{identity.name}.json", json.dumps(context, indent=2) + "\n")
    return out
