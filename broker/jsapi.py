"""NATS's own names: every ``$JS.API`` subject, header, status and error code trainfleet uses.

``names.py`` spells trainfleet's names; this module spells JetStream's (and the
object store's, KV's and micro's wire names), so no other module writes a
``$JS.`` subject, a ``Nats-*`` header or a numeric error code. Requests built
from these go out on a plain connection (batched direct gets, no_wait pulls,
the object-store client) where nats-py has no helper fast enough.
"""

from __future__ import annotations

from typing import Any

API = "$JS.API"

# -- headers ----------------------------------------------------------------
STATUS = "Status"  # on status messages: 100, 204, 404, 408, 409, 503
DESCRIPTION = "Description"  # the text beside a status
MSG_ID = "Nats-Msg-Id"  # de-duplication inside the stream's duplicate window
SEQUENCE = "Nats-Sequence"  # a direct get's stream sequence
ROLLUP = "Nats-Rollup"  # "sub": keep only this message on its subject (object info records)
KV_OPERATION = "KV-Operation"  # DEL or PURGE on a KV delete marker
MARKER_REASON = "Nats-Marker-Reason"  # a server-placed delete marker (a TTL expiry)
SERVICE_ERROR = "Nats-Service-Error"  # micro: the error text of a failed request
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"  # micro: its code

ROLLUP_SUBJECT = {ROLLUP: "sub"}
# A publish stored only while the subject's last message is at this stream sequence.
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"

# -- status codes (the Status header) ----------------------------------------
STATUS_HEARTBEAT = "100"  # idle heartbeat / flow control
STATUS_END_OF_BATCH = "204"  # a batched direct get sent all it had
STATUS_NOT_FOUND = "404"  # no message (a no_wait pull on an empty consumer, or nothing more to get)
STATUS_TIMEOUT = "408"  # a pull request expired
STATUS_CONFLICT = "409"  # the consumer was deleted or changed, or limits exceeded
STATUS_NO_RESPONDERS = "503"  # nothing listens on the subject

# -- JetStream API error codes (``error.err_code`` of an API response) --------
ERR_NO_MESSAGE = 10037  # STREAM.MSG.GET found no message
ERR_WRONG_LAST_SEQUENCE = 10071  # a publish's expected last (subject) sequence is not the stream's
ERR_STREAM_NAME_IN_USE = 10058  # the stream exists with another config
ERR_STREAM_NOT_FOUND = 10059

# Storage limits (nats-server's server/errors.json; the constant there in brackets).
# A publish over the account's JetStream limits (max_file of the account) [JSAccountResourcesExceededErr]
ERR_ACCOUNT_RESOURCES_EXCEEDED = 10002  # "resource limits exceeded for account"
# A publish while the server's own limit (max_file_store / max_memory_store) is used up [JSInsufficientResourcesErr]
ERR_INSUFFICIENT_RESOURCES = 10023  # "insufficient resources"
# A memory stream's max_bytes cannot be reserved [JSMemoryResourcesExceededErr]
ERR_MEMORY_RESOURCES_EXCEEDED = 10028  # "insufficient memory resources available"
# A stream create/update whose max_bytes (times replicas) cannot be reserved within the
# server's max_file_store or the account's max_file [JSStorageResourcesExceededErr]
ERR_STORAGE_RESOURCES_EXCEEDED = 10047  # "insufficient storage resources available"
# A stream operation failed; the description is the cause, e.g. a purge's
# "write …: no space left on device" on a full disk [JSStreamGeneralErrorF]
ERR_STREAM_GENERAL = 10051
# Storing a message failed; the description says why, e.g. "maximum bytes exceeded" for a
# stream at its max_bytes with discard new [JSStreamStoreFailedF]
ERR_STREAM_STORE_FAILED = 10077
# The account wants max_bytes on every stream [JSStreamMaxBytesRequired]
ERR_STREAM_MAX_BYTES_REQUIRED = 10113  # "account requires a stream config to have max bytes set"
# max_bytes above the account's max_stream_bytes [JSStreamMaxStreamBytesExceeded]
ERR_STREAM_MAX_STREAM_BYTES_EXCEEDED = 10122  # "stream max bytes exceeds account limit max stream bytes"

# The limit behind each storage error, as an operator would look for it.
LIMIT_SERVER_FILE_STORE = "the server's JetStream file storage limit (max_file_store, in its jetstream config block)"
LIMIT_ACCOUNT_FILE = "the account's JetStream storage limit (max_file in the account's jetstream block)"
LIMIT_DISK = "the disk under the server's JetStream store_dir (no space left on device)"
LIMIT_STREAM_MAX_BYTES = "the stream's own max_bytes (with discard new)"
LIMIT_MAX_BYTES_REQUIRED = "the account's max_bytes_required (every stream must set max_bytes)"
LIMIT_ACCOUNT_STREAM_BYTES = "the account's max_stream_bytes (the most one stream may reserve)"
NO_SPACE = "no space left on device"  # ENOSPC as the server quotes it


def storage_limit(code: int | None, description: str = "") -> str | None:
    """Which storage limit an error hit (one of the LIMIT_* phrases), or None when the error is
    not about storage. The codes are checked first; a disk that is full shows only in the
    description (under 10051, 10077, or a create/update/purge error of its own)."""
    if NO_SPACE in description.lower():
        return LIMIT_DISK
    if code == ERR_ACCOUNT_RESOURCES_EXCEEDED:
        return LIMIT_ACCOUNT_FILE
    if code in (ERR_INSUFFICIENT_RESOURCES, ERR_STORAGE_RESOURCES_EXCEEDED, ERR_MEMORY_RESOURCES_EXCEEDED):
        return LIMIT_SERVER_FILE_STORE
    if code == ERR_STREAM_MAX_BYTES_REQUIRED:
        return LIMIT_MAX_BYTES_REQUIRED
    if code == ERR_STREAM_MAX_STREAM_BYTES_EXCEEDED:
        return LIMIT_ACCOUNT_STREAM_BYTES
    if code == ERR_STREAM_STORE_FAILED and "maximum bytes" in description.lower():
        return LIMIT_STREAM_MAX_BYTES
    return None


# -- API subjects --------------------------------------------------------------
def consumer_next(stream: str, consumer: str, api: str = API) -> str:
    """Pull request subject of a pull consumer."""
    return f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}"


def consumer_create(stream: str, consumer: str, api: str = API) -> str:
    return f"{api}.CONSUMER.CREATE.{stream}.{consumer}"


def consumer_delete(stream: str, consumer: str, api: str = API) -> str:
    return f"{api}.CONSUMER.DELETE.{stream}.{consumer}"


def stream_msg_get(stream: str, api: str = API) -> str:
    return f"{api}.STREAM.MSG.GET.{stream}"


def stream_purge(stream: str, api: str = API) -> str:
    return f"{api}.STREAM.PURGE.{stream}"


def stream_info(stream: str, api: str = API) -> str:
    return f"{api}.STREAM.INFO.{stream}"


def direct_get(stream: str, api: str = API) -> str:
    """Direct get (the stream must allow it); batched with ``batch`` on nats-server >= 2.11."""
    return f"{api}.DIRECT.GET.{stream}"


def max_deliveries_advisory(stream: str, consumer: str = "*") -> str:
    """Published when a message of ``consumer`` hits its max_deliver."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"


# -- object store (ADR-20) and KV (ADR-8) layouts -----------------------------
def object_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def object_chunks_prefix(bucket: str) -> str:
    """Chunks of object ``nuid`` are on this prefix + nuid."""
    return f"$O.{bucket}.C."


def object_meta_prefix(bucket: str) -> str:
    """The info of an object is on this prefix + base64url(name)."""
    return f"$O.{bucket}.M."


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


# -- reading what comes back --------------------------------------------------
def status_of(msg: Any) -> str | None:
    """A status message's code (``404``, ``503``…), or None for an ordinary message."""
    headers = getattr(msg, "headers", None)
    return headers.get(STATUS) if headers else None


def description_of(msg: Any) -> str:
    """The first line of a status message's description."""
    headers = getattr(msg, "headers", None) or {}
    return (headers.get(DESCRIPTION) or "").split("\n")[0]


def kv_operation(headers: dict[str, str]) -> str | None:
    """DEL or PURGE for a KV delete mark (a server-placed expiry marker counts as a purge), else None."""
    if KV_OPERATION in headers:
        return headers[KV_OPERATION]
    return "PURGE" if MARKER_REASON in headers else None


def reply_fields(reply: str) -> tuple[int, int]:
    """(consumer sequence, pending) from a JetStream delivery's reply subject (v1 or v2 form)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[6]), int(tokens[8])
    if len(tokens) >= 12:
        return int(tokens[8]), int(tokens[10])
    raise ValueError(f"not a JetStream delivery: {reply!r}")


def api_error(resp: dict[str, Any]) -> tuple[int | None, str]:
    """(err_code, description) of an API response's ``error``."""
    err = resp.get("error") or {}
    return err.get("err_code"), str(err.get("description", resp))
