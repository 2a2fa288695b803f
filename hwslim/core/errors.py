"""User-facing errors: the CLI prints their message on one line and exits 2.

Raise these (never a bare ValueError) for anything the *user* can fix: a missing or
corrupt file, a config for the wrong model, a budget nothing can meet. The message
says what is wrong and, where it helps, what to do.
"""
from __future__ import annotations


class HwslimError(Exception):
    """Base class for errors caused by user input; the CLI exits 2 on them."""


class ConfigError(HwslimError):
    """A channel config that does not fit the model, or an unreadable config file."""


class ModelError(HwslimError):
    """An unknown model name or an invalid model argument."""


class CheckpointError(HwslimError):
    """A missing, truncated or foreign checkpoint."""


class TableError(HwslimError):
    """A missing latency table, or one measured on another setup."""


class BudgetError(HwslimError):
    """A budget that no config on the grid can meet."""


class OutputExistsError(HwslimError):
    """An output that would overwrite something the user has (pass --force)."""
