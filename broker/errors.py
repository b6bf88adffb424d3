"""Error hierarchy: one base, then one family per thing a user can fix."""

from __future__ import annotations


class TrainfleetError(Exception):
    """Base of every error trainfleet raises on purpose."""

    exit_code = 1


class SchemaError(TrainfleetError):
    """A message or record that cannot be decoded (garbage or a newer schema)."""


class ManifestError(TrainfleetError):
    """One or more problems in a manifest; ``problems`` lists each of them."""

    exit_code = 2

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


class BrokerError(TrainfleetError):
    """NATS is unreachable or a resource is missing or misconfigured."""

    exit_code = 3


class ServerStartError(BrokerError):
    """The embedded nats-server did not come up."""


class JobNotFound(TrainfleetError):
    exit_code = 4


class AmbiguousJob(TrainfleetError):
    exit_code = 4


class ArtifactError(TrainfleetError):
    """An artifact failed verification, is missing, or is unsafe to extract."""

    exit_code = 5


class LeaseLost(TrainfleetError):
    """The job record moved on without us: cancelled, requeued or taken over."""
