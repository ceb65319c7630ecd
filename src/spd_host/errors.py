"""One exception hierarchy for everything spd-host reports to a person.

Every message says what was wrong, where, and what to do about it. The CLI prints
``SpdHostError`` subclasses without a traceback and exits non-zero; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class SpdHostError(Exception):
    """Base class: an error whose message is meant for the user.

    ``hint`` is the "what to do" part; it is appended to the message so that a plain
    ``str(err)`` is already actionable.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class DecompositionIdError(SpdHostError):
    """A decomposition ID does not parse, or names an unknown method."""

    exit_code = 2


class PluginError(SpdHostError):
    """A plugin failed to load, register, or broke its contract (names the plugin)."""


class SourceNotFoundError(SpdHostError):
    """A decomposition's files (local path, Hub repo, wandb run) cannot be found."""


class FormatError(SpdHostError):
    """Files exist but are not in a format we can read: missing or mis-shaped tensors, bad config."""


class TopologyError(SpdHostError):
    """A model's architecture cannot be mapped, or a canonical address/hook point does not exist."""


class HarvestBatchError(PluginError):
    """A plugin's HarvestFn returned a batch that violates the HarvestBatch contract."""


class DatasetError(SpdHostError):
    """A token dataset cannot be found, read or tokenized."""


class ResultsNotFoundError(SpdHostError):
    """Stored results (a harvest, labels, evals) that were asked for do not exist."""


class ConfigError(SpdHostError):
    """An option or configuration value is invalid."""
