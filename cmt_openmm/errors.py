"""Errors raised for bad input: one sentence saying what is wrong and what to do."""


class CMTInputError(ValueError):
    """A user-supplied input (system, positions, config, checkpoint) cannot be used as given."""
