"""The one error tree: a base, then one family per thing a user can fix.

Every error trainfleet raises on purpose is a class here, and each class carries
the process exit code the CLI returns for it and the micro-service error code
the control service answers with. Nothing else defines an exit code.

exit 0  done
exit 1  jobs failed, no host can run it, or the operation was refused
        (Refused, Conflict, Unsatisfied, FleetError, SchemaError, RemoteError)
exit 2  bad usage or an invalid manifest (UsageError, ManifestError)
exit 3  NATS unreachable, not provisioned, or no controller answering (BrokerError and kin);
        also a JetStream storage limit reached (StorageLimit: StoreFull, StoreTooSmall)
exit 4  no job matches, or an id prefix matches several (JobNotFound, AmbiguousJob)
exit 5  artifact missing, corrupt or unsafe (ArtifactError, ObjectNotFound)
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors

EXIT_OK = 0
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
# What --help says of the exit codes (the table above, in a line).
EXIT_CODES_HELP = (
    "exit codes: 0 ok, 1 failed (jobs or the operation), 2 bad usage or invalid manifest, "
    "3 NATS unreachable / not provisioned / JetStream unavailable / storage limit reached / no controller "
    "answering, 4 no such job or ambiguous prefix, "
    "5 artifact missing, corrupt or unsafe"
)

# Errors worth waiting out: a reconnect, a leader election, a slow server.
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    asyncio.TimeoutError,
    OSError,
)


class TrainfleetError(Exception):
    """Base of every error trainfleet raises on purpose (never raised itself)."""

    exit_code = 1
    service_code = "409"  # the Nats-Service-Error-Code a control endpoint answers with


# -- exit 1 -----------------------------------------------------------------
class Refused(TrainfleetError):
    """The operation makes no sense in the job's state (cancel a finished job, requeue a running one)."""


class Conflict(Refused):
    """A record kept changing under a write (every retry lost its compare-and-swap)."""


class Unsatisfied(TrainfleetError):
    """The answer is no: some jobs failed, or no live worker can run a job."""


class FleetError(TrainfleetError):
    """A local fleet (``trainfleet up``) could not finish: a process died, or time ran out."""


class UntrustedSpec(TrainfleetError):
    """A job spec an agent will not run: unsigned or signed by a key it does not trust, changed
    after signing, or not the spec of the job it was read for."""


class SchemaError(TrainfleetError):
    """A message or record that cannot be decoded (garbage or a newer schema)."""


# -- exit 2 -----------------------------------------------------------------
class UsageError(TrainfleetError):
    """Bad arguments or a malformed request."""

    exit_code = 2
    service_code = "400"


class ManifestError(UsageError):
    """One or more problems in a manifest; ``problems`` lists each of them."""

    def __init__(self, problems: list[ManifestProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ManifestProblem:
    """One manifest error, naming the file, the job and the field."""

    def __init__(self, file: str, message: str, job: str | None = None, field: str | None = None):
        self.file = file
        self.job = job
        self.field = field
        self.message = message

    def __str__(self) -> str:
        where = self.file
        if self.job is not None:
            where += f": job {self.job}"
        if self.field is not None:
            where += f": field {self.field!r}"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, str | None]:
        return {"file": self.file, "job": self.job, "field": self.field, "message": self.message}


# -- exit 3 -----------------------------------------------------------------
class BrokerError(TrainfleetError):
    """NATS is unreachable or a resource is missing or misconfigured."""

    exit_code = 3
    service_code = "503"


class ServerStartError(BrokerError):
    """The embedded nats-server did not come up."""


class Unreachable(BrokerError):
    """No NATS server answers at the configured URL(s)."""


class NotProvisioned(BrokerError):
    """A stream, bucket or object store trainfleet needs does not exist."""


class JetStreamUnavailable(BrokerError):
    """JetStream kept failing to answer (no leader, no quorum) for longer than we wait out."""


class NoController(BrokerError):
    """No controller answers on the control subjects (or none answered in time)."""


class ConsumerUnavailable(BrokerError):
    """A pull consumer is gone or was changed under us; ensure it again before the next pull."""


class DirectUnavailable(BrokerError):
    """The direct download path cannot be used here (TLS, auth refused, unreachable): use the normal one."""


class StorageLimit(BrokerError):
    """A JetStream storage limit stopped a write. The message names the stream or bucket, the
    limit (the server's max_file_store, the account's max_file, the disk, a stream's max_bytes)
    and the setting or action that fixes it (docs/operations.md, "When the store is full")."""


class StoreFull(StorageLimit):
    """The store has no room now; freeing space (or raising the limit) fixes it, so the same
    write can succeed later: retry later (an upload: hand the job back)."""


class StoreTooSmall(StorageLimit):
    """A configured size can never fit the server's or the account's limit (a logs stream bigger
    than max_file_store): change the setting or the limit; trying again as it is cannot help."""


# -- exit 4 -----------------------------------------------------------------
class JobNotFound(TrainfleetError):
    """No job matches the name, id or id prefix."""

    exit_code = 4
    service_code = "404"


class AmbiguousJob(TrainfleetError):
    """An id prefix (or a name) matches several jobs."""

    exit_code = 4
    service_code = "404"


# -- exit 5 -----------------------------------------------------------------
class ArtifactError(TrainfleetError):
    """An artifact failed verification, is missing, or is unsafe to extract."""

    exit_code = 5
    service_code = "422"


class PackError(ArtifactError):
    """The trainer's output cannot be bundled as it is (an unreadable file, a link out of the
    output dir): retrying would not change it, so the job fails at once, naming the file."""


class ObjectNotFound(ArtifactError):
    """No (undeleted) object of that name is in the bucket."""


# -- errors a controller reported -------------------------------------------
class RemoteError(TrainfleetError):
    """An error a controller answered a control request with; carries the controller's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class RemoteManifestError(RemoteError):
    """A manifest a controller refused; ``problems`` as the controller listed them (dicts)."""

    def __init__(self, message: str, problems: list[dict[str, Any]], exit_code: int = 2):
        super().__init__(message, exit_code)
        self.problems = problems
