"""Errors a user can act on.

The engine raises a FlameError kind; the CLI prints it as one red line and exits 1 (`FLAME_DEBUG=1` shows the
traceback). The message names the problem; `fix` says what to do about it.
"""


class FlameError(Exception):
    """A problem with the user's input or environment, with the fix."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}: {self.fix}" if self.fix else self.message


class ConfigError(FlameError):
    """An option or configuration value is wrong or inconsistent."""


class DataError(FlameError):
    """A corpus, dataset or tokenizer cannot be read or used."""


class ModelError(FlameError):
    """A model config or model dir cannot be built or loaded."""


class CheckpointError(FlameError):
    """A checkpoint or run dir is missing, incomplete or does not match."""


class OutputExistsError(FlameError):
    """An output path exists and would be overwritten."""


class TrainingError(FlameError):
    """Training cannot go on (e.g. the loss diverged); what was trained is saved first."""
