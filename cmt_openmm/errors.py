"""Errors that reach people: one sentence saying what is wrong and what to do."""


class CMTInputError(ValueError):
    """A user-supplied input (system, positions, config, checkpoint) cannot be used as given."""


class CMTTrainingDiverged(CMTInputError):
    """Training ended because step ``step`` + 1 stayed non-finite after every rollback; the run's
    checkpoint holds step ``step`` (0: none was written) and no generator file was written."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class CMTWriteError(CMTInputError, OSError):
    """A file cannot be written where it was asked for (full disk, read-only or forbidden folder);
    the previous file is intact. Also an ``OSError``, so that code tolerating an unwritable cache
    still does; the original error is its ``__cause__``."""


class CMTPeerLost(RuntimeError):
    """A process of a run under torchrun lost contact with the others (one of them stopped); the
    run's last checkpoint is intact."""
