"""User-facing errors: one clear line, a non-zero exit, no traceback (the CLI catches these)."""


class PluribusError(Exception):
    """A mistake the user can fix (bad config, missing file, incompatible models)."""

    exit_code = 1


class ConfigError(PluribusError):
    """An invalid config file or value; exit code 2, as for a command-line usage error.

    `field` (a dotted path) and `problem`, where known, let a caller re-word where the field came from."""

    exit_code = 2

    def __init__(self, message: str, field: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.field, self.problem = field, problem
