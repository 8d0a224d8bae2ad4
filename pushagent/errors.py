"""One exception family; the CLI maps each class to an exit code (SPEC section 3)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_AUTH = 4
EXIT_INTERRUPTED = 75


class StopRequested(Exception):
    """A stop signal interrupted work that only reads (verification): nothing is left half-done."""


class ChunkAborted(Exception):
    """The run is stopping (signal, or the outage budget ran out): the chunk stays unresolved."""


class PushAgentError(Exception):
    """Root of every error pushagent raises on purpose.

    `file` and `line` name the input position when one is known, so the
    message can say where to look; `hint` says what to do about it.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message, *, file=None, line=None, hint=None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.hint = hint

    def __str__(self):
        where = f"{self.file}:{self.line}: " if self.file and self.line else (f"{self.file}: " if self.file else "")
        text = f"{where}{self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class ConfigError(PushAgentError):
    """Bad configuration, flags or input paths: nothing was sent."""

    exit_code = EXIT_USAGE


class BatchLockedError(PushAgentError):
    """Another process holds the lock of this batch."""

    exit_code = EXIT_USAGE


class AuthError(PushAgentError):
    """The cluster refused our credentials (401) or privileges (403)."""

    exit_code = EXIT_AUTH


class ClusterUnavailableError(PushAgentError):
    """The cluster answered nothing useful for `outage_seconds`: stop instead of spinning."""

    exit_code = EXIT_FAILURE


class QueueError(PushAgentError):
    """The retry queue backend failed or is unreachable."""

    exit_code = EXIT_FAILURE


class LedgerError(PushAgentError):
    """Records read != indexed + current + queued + dead + quarantined."""

    exit_code = EXIT_FAILURE


class InputChangedError(ConfigError):
    """An input object changed since it was listed or checkpointed: its versions are never mixed."""


class StorageError(PushAgentError):
    """S3-compatible storage failed or refused a request."""

    exit_code = EXIT_FAILURE
