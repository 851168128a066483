"""The exception tree of tagrelay.

::

    TagrelayError
     +-- ConfigError            the configuration file is invalid (carries every problem)
     +-- IngestError            one request or event is rejected (-> 4xx with a reason code)
     |    +-- AuthError         missing or unknown write key (-> 401)
     +-- SpoolUnavailable       the spool cannot commit (disk full, permissions) (-> 503)
     +-- StartupError           ``tagrelay serve`` cannot start; the message says what to fix
     |    +-- DataDirError      the data directory cannot be created or written to
     |    +-- ListenError       a listener (public or admin) cannot bind its address
     |    +-- EncryptionKeyError  data on disk is encrypted under a key not configured
     +-- IdentityStoreError     the identity store cannot be opened (a key missing from
     |                          encryption.keys) or read
     +-- WarehouseError         a warehouse statement failed
          +-- WarehouseLocked   another process holds the warehouse file
          +-- QueryRejected     ``tagrelay sql`` got a statement it may not run
          +-- QueryTimeout      a ``tagrelay sql`` query ran past its time limit and was stopped

Messages say what was expected, what arrived and what to do; they never carry secrets.
"""

from __future__ import annotations

from dataclasses import dataclass


class TagrelayError(Exception):
    """Base class of every error raised on purpose by tagrelay."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration file: where it is and what is wrong."""

    path: str
    """Dotted key path, e.g. ``forwarders[1].batch.max_events``; empty for the root."""
    line: int | None
    """1-based line in the YAML file, when known."""
    message: str

    def __str__(self) -> str:
        where = self.path or "<root>"
        if self.line is not None:
            where = f"line {self.line}: {where}"
        return f"{where}: {self.message}"


class ConfigError(TagrelayError):
    """The configuration is invalid. ``problems`` lists every problem found, not just the first."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the configuration:\n{lines}")


class IngestError(TagrelayError):
    """A request or an event was rejected. ``code`` is a bounded reason used in metrics."""

    status = 400

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        self.code = code
        self.message = message
        if status is not None:
            self.status = status
        super().__init__(f"{code}: {message}")


class AuthError(IngestError):
    """The write key is missing, unknown or not allowed on this endpoint."""

    status = 401


class SpoolUnavailable(TagrelayError):
    """The spool could not commit; nothing in the failed commit was acknowledged."""


class StartupError(TagrelayError):
    """The relay cannot start; the message says what to fix."""


class DataDirError(StartupError):
    """The data directory cannot be created or written to (permissions, a read-only
    filesystem, a file in the way)."""


class ListenError(StartupError):
    """A listener cannot bind its address (in use, not an address of this machine, a
    privileged port)."""


class EncryptionKeyError(StartupError):
    """The spool (or another store) holds data encrypted under a key that
    ``encryption.keys`` does not hold, or encrypted data while no key is configured. The
    relay refuses to start rather than fail on every read later, or write plaintext next
    to data it cannot read."""


class IdentityStoreError(TagrelayError):
    """The identity store cannot be opened or read: encrypted under a key that is not in
    ``encryption.keys``, or a record that does not decrypt. At start-up the relay refuses to
    start with it."""


class WarehouseError(TagrelayError):
    """A warehouse statement failed."""


class WarehouseLocked(WarehouseError):
    """Another process has the warehouse file open (DuckDB locks it for one process)."""


class QueryRejected(WarehouseError):
    """``tagrelay sql`` was given a statement that is not a read-only query."""


class QueryTimeout(WarehouseError):
    """A ``tagrelay sql`` query ran past its time limit and was interrupted."""
