"""Who we are to the NATS server, and how we talk to it: credentials, TLS, nats CLI contexts.

:func:`resolve` turns :class:`Settings` (flags and env) plus an optional nats CLI context into
one :class:`ClientSecurity`, whose :meth:`~ClientSecurity.connect_options` are what
``nats.connect`` takes. Every problem that will not go away by waiting (a missing file, a
refused password, a certificate that does not verify) is an :class:`Unreachable` whose message
names it, and no message, log line or ``repr`` ever carries a password or a token: URLs go
through :func:`redact_url`.

The supported credentials are those of the ``nats`` CLI: a creds file (user JWT + nkey seed),
an nkey seed file, a user and password, a token (also ``user:pass@`` or ``token@`` in the URL),
TLS with a CA, and a client certificate (mTLS).
"""

from __future__ import annotations

import json
import os
import ssl
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors

from trainfleet.broker.errors import Unreachable
from trainfleet.broker.settings import DEFAULT_URL, Settings

# Context keys naming a file (the nats CLI writes the rest as plain strings).
CONTEXT_FILES = {"creds": "creds", "nkey": "nkey", "cert": "tls_cert", "key": "tls_key", "ca": "tls_ca"}
CONTEXT_STRINGS = {"user": "user", "password": "password", "token": "token"}
CREDENTIAL_KINDS = {"creds": ("creds",), "nkey": ("nkey",), "login": ("user", "password"), "token": ("token",)}
CREDENTIAL_FIELDS = tuple(name for names in CREDENTIAL_KINDS.values() for name in names)
# Flags naming each file, for messages.
FLAG_OF = {"creds": "--creds", "nkey": "--nkey", "tls_ca": "--tls-ca", "tls_cert": "--tls-cert", "tls_key": "--tls-key"}
CREDS_MARKERS = (b"BEGIN NATS USER JWT", b"BEGIN USER NKEY SEED")  # the JWT block comes first


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list of them) without user info: no user, password or token."""
    return ",".join(_redact_one(part.strip()) for part in url.split(","))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.rpartition("://") if "://" in url else ("", "", url)
    authority, slash, path = rest.partition("/")
    # rpartition: a password may itself hold an "@".
    host = authority.rpartition("@")[2]
    return f"{scheme}{sep}{host}{slash}{path}"


# -- nats CLI contexts -------------------------------------------------------------
def context_path(name: str, env: Mapping[str, str] | None = None) -> Path:
    """The file of nats context ``name``: ``$XDG_CONFIG_HOME/nats/context/<name>.json`` (default
    ``~/.config``), or ``name`` itself when it is a path to a ``.json`` file."""
    env = os.environ if env is None else env
    if name.endswith(".json") or os.sep in name:
        return Path(name).expanduser()
    config = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(config) / "nats" / "context" / f"{name}.json"


def load_context(name: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings of nats context ``name`` as the nats CLI wrote them, empty values left out."""
    path = context_path(name, env)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise Unreachable(f"nats context {name!r}: file not found: {path}") from None
    except OSError as exc:
        raise Unreachable(f"nats context {name!r}: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise Unreachable(f"nats context {name!r}: {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Unreachable(f"nats context {name!r}: {path} does not hold a JSON object")
    values = {k: v for k, v in data.items() if isinstance(v, str | bool) and v not in ("", False)}
    if values.get("user_jwt"):
        raise Unreachable(f"nats context {name!r}: user_jwt is not supported here: use a creds file (creds)")
    return values


def _context_file(name: str, key: str, value: str) -> str:
    """A file named in a context: a path or a ``file://`` URI (other credential URIs need tools we lack)."""
    if value.startswith("file://"):
        value = value[len("file://") :]
    elif "://" in value or value.startswith("data:"):
        scheme = value.split(":", 1)[0]
        raise Unreachable(f"nats context {name!r}: {key}: {scheme}: credentials are not supported, only file paths")
    return str(Path(value).expanduser())


# -- the resolved security of one client -----------------------------------------
@dataclass(frozen=True)
class ClientSecurity:
    """Everything about how one client authenticates and encrypts, secrets hidden from repr."""

    servers: tuple[str, ...] = field(repr=False)
    creds: str | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_first: bool = False
    inbox_prefix: str | None = None
    context: str | None = None  # the context file the values came from, if any

    @property
    def where(self) -> str:
        """The servers, for messages: without user info."""
        return redact_url(",".join(self.servers))

    @property
    def wants_tls(self) -> bool:
        """TLS was asked for: a ``tls://`` URL, a CA, a client certificate, or TLS-first."""
        tls_url = any(s.startswith("tls://") for s in self.servers)
        return tls_url or bool(self.tls_ca or self.tls_cert or self.tls_key or self.tls_first)

    def credentials(self) -> str:
        """What we authenticate with, in words, for messages (never a secret)."""
        if self.creds:
            return f"creds file {self.creds}"
        if self.nkey:
            return f"nkey seed file {self.nkey}"
        if self.user:
            return f"user {self.user!r} with a password"
        if self.token:
            return "a token"
        if any("@" in s.split("://", 1)[-1].split("/", 1)[0] for s in self.servers):
            return "the user info in the URL"
        if self.tls_cert:
            return f"client certificate {self.tls_cert}"
        return "no credentials"

    def check(self) -> None:
        """Raise :class:`Unreachable` for what would fail at connect time however long we wait:
        a credential or certificate file missing, unreadable or malformed, a half-given login."""
        if (self.user is None) != (self.password is None):
            raise Unreachable("a user needs a password and a password a user (--user/--password, NATS_USER/_PASSWORD)")
        if self.tls_key and not self.tls_cert:
            raise Unreachable("--tls-key was given without --tls-cert")
        for attr in ("creds", "nkey", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, attr)
            if path:
                _check_file(path, FLAG_OF[attr], attr)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context: the CA (else the system's), our certificate; None without TLS."""
        if not self.wants_tls:
            return None
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
        except (ssl.SSLError, ValueError) as exc:
            raise Unreachable(f"cannot load the CA certificate {self.tls_ca} (--tls-ca): {exc}") from None
        if self.tls_cert:
            try:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, ValueError) as exc:
                raise Unreachable(
                    f"cannot load the client certificate {self.tls_cert} with key {self.tls_key or self.tls_cert} "
                    f"(--tls-cert/--tls-key): {exc}"
                ) from None
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``: servers, credentials, TLS, inbox prefix."""
        opts: dict[str, Any] = {"servers": list(self.servers)}
        if self.creds:
            opts["user_credentials"] = self.creds
        elif self.nkey:
            opts["nkeys_seed"] = self.nkey
        if self.user is not None:
            opts.update(user=self.user, password=self.password)
        if self.token is not None:
            opts["token"] = self.token
        tls = self.ssl_context()
        if tls is not None:
            opts["tls"] = tls
            opts["tls_handshake_first"] = self.tls_first
        if self.inbox_prefix:
            opts["inbox_prefix"] = self.inbox_prefix
        return opts


def _check_file(path: str, flag: str, kind: str) -> None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64 * 1024)
    except FileNotFoundError:
        raise Unreachable(f"file not found: {path} ({flag})") from None
    except OSError as exc:
        raise Unreachable(f"cannot read {path} ({flag}): {exc.strerror or exc}") from None
    # nats-py loops forever on a creds file without the JWT block: refuse one here.
    if kind == "creds":
        try:
            parse_creds(head)
        except ValueError:
            raise Unreachable(f"not a NATS credentials file (no user JWT and seed blocks): {path} ({flag})") from None
    if kind == "nkey":
        _check_seed(head.strip(), path, flag)


def parse_creds(data: bytes) -> tuple[str, bytes]:
    """The user JWT and nkey seed of a creds file's contents (``nsc``/``nats`` write them as
    a ``BEGIN NATS USER JWT`` block, then a ``BEGIN USER NKEY SEED`` block); ValueError if not."""
    found: dict[bytes, bytes] = {}
    lines = iter(data.splitlines())
    for line in lines:
        for marker in CREDS_MARKERS:
            if marker in line:
                found[marker] = next((x.strip() for x in lines if x.strip()), b"")
    jwt, seed = (found.get(marker, b"") for marker in CREDS_MARKERS)
    if not jwt or not seed or jwt.startswith(b"-") or seed.startswith(b"-"):
        raise ValueError("not a NATS credentials file")
    return jwt.decode(), seed


def _check_seed(seed: bytes, path: str, flag: str) -> None:
    import nkeys

    try:
        nkeys.from_seed(bytearray(seed)).wipe()
    except Exception:  # nkeys raises several unrelated types for a bad seed
        raise Unreachable(f"not an nkey seed file: {path} ({flag})") from None


def resolve(settings: Settings, env: Mapping[str, str] | None = None) -> ClientSecurity:
    """The security of a client with ``settings``: a nats context's values (``settings.context``),
    overridden by those set explicitly (flags and env). Explicit credentials drop the context's
    of other kinds (a ``--user`` never gets mixed with its creds file; a ``--password`` alone
    keeps its user), and an explicit ``--tls-cert`` drops its key."""
    explicit = {
        "creds": settings.creds,
        "nkey": settings.nkey,
        "user": settings.user,
        "password": settings.password,
        "token": settings.token,
        "tls_ca": settings.tls_ca,
        "tls_cert": settings.tls_cert,
        "tls_key": settings.tls_key,
        "inbox_prefix": settings.inbox_prefix,
    }
    values: dict[str, Any] = {}
    url = settings.url
    if settings.context:
        ctx = load_context(settings.context, env)
        values = _from_context(settings.context, ctx)
        # The default URL means none was given: the context's wins then.
        if url == DEFAULT_URL and ctx.get("url"):
            url = str(ctx["url"])
        given = {kind for kind, names in CREDENTIAL_KINDS.items() if any(explicit[n] is not None for n in names)}
        if given:  # credentials of another kind than those given explicitly are dropped
            values = {k: v for k, v in values.items() if k not in CREDENTIAL_FIELDS or _kind_of(k) in given}
        if explicit["tls_cert"] is not None:
            values.pop("tls_key", None)
        values["context"] = str(context_path(settings.context, env))
    values.update({k: v for k, v in explicit.items() if v is not None})
    servers = tuple(u.strip() for u in url.split(",") if u.strip())
    return ClientSecurity(servers=servers, **values)


def _kind_of(name: str) -> str:
    return next(kind for kind, names in CREDENTIAL_KINDS.items() if name in names)


def _from_context(name: str, ctx: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, attr in CONTEXT_FILES.items():
        if ctx.get(key):
            values[attr] = _context_file(name, key, str(ctx[key]))
    for key, attr in CONTEXT_STRINGS.items():
        if ctx.get(key):
            values[attr] = str(ctx[key])
    if ctx.get("inbox_prefix"):
        values["inbox_prefix"] = str(ctx["inbox_prefix"])
    values["tls_first"] = ctx.get("tls_first") is True
    return values


# -- why a connect failed --------------------------------------------------------------
def failure_reason(exc: BaseException, security: ClientSecurity) -> str | None:
    """Why a connect attempt failed, in words, when waiting will not help (refused credentials,
    TLS that does not verify, a file gone); None for what may pass (nobody listening yet)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verify failed: {exc.verify_message} (is --tls-ca the CA that signed the "
            "server's certificate, and does the certificate name the host in the URL?)"
        )
    if isinstance(exc, ssl.SSLError):
        return _tls_refused(exc, security)
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    if isinstance(exc, PermissionError | IsADirectoryError) and exc.filename:
        return f"cannot read {exc.filename}: {exc.strerror}"
    if isinstance(exc, nats.errors.Error):
        text = str(exc).lower()
        if "authorization violation" in text or "authorization failed" in text:
            given = security.credentials()
            if given == "no credentials":
                return (
                    "authorization violation: the server wants credentials and none were given "
                    "(--creds, --nkey, --user/--password, --token, --tls-cert or --context)"
                )
            return f"authorization violation: the server refused {given}"
        if "authentication expired" in text:
            return f"authentication expired: the credentials ({security.credentials()}) are no longer valid"
    return None


def _tls_refused(exc: ssl.SSLError, security: ClientSecurity) -> str:
    reason = (exc.reason or str(exc)).lower().replace("_", " ")
    if "certificate required" in reason:
        return "TLS: the server requires a client certificate (give --tls-cert and --tls-key)"
    if "alert" in reason:
        what = f"client certificate {security.tls_cert}" if security.tls_cert else "the TLS handshake"
        return f"TLS: the server rejected {what}: {reason}"
    return f"TLS handshake failed: {reason}"


def server_mismatch(info: Mapping[str, Any] | None, security: ClientSecurity) -> str | None:
    """What is wrong between the server's INFO and our TLS wishes, or None. nats-py itself
    would silently talk plaintext to a server without TLS even when TLS was asked for."""
    if info is None:
        return None
    if info.get("tls_required") and not security.wants_tls:
        return (
            "server requires TLS: give --tls-ca (the CA that signed its certificate), "
            "or use a tls:// URL if a system CA signed it"
        )
    if security.wants_tls and not info.get("tls_required") and not security.tls_first:
        return (
            "TLS was asked for (a tls:// URL, --tls-ca or --tls-cert) but the server does not require TLS: "
            "refusing to send credentials in the clear (a plaintext server, or one with allow_non_tls)"
        )
    return None


# -- which security a live client uses --------------------------------------------
_CLIENTS: weakref.WeakKeyDictionary[Any, ClientSecurity] = weakref.WeakKeyDictionary()


def remember(client: Any, security: ClientSecurity) -> None:
    """Note that ``client`` connected with ``security`` (the direct download path asks)."""
    _CLIENTS[client] = security


def security_of(client: Any) -> ClientSecurity | None:
    """The security ``client`` connected with, when :func:`remember` was told."""
    return _CLIENTS.get(client)
