"""The errors a user can fix: each message is one sentence naming the setting, file or
checkpoint at fault and what would work instead.

The entry points (``flip.cli``) print any of them, wherever it is raised during a run
(inside ``hydra.utils.instantiate``, a datamodule's ``setup``, a checkpoint restore), as one
``error: …`` line with a non-zero exit and no traceback (``verbose=true`` or
``HYDRA_FULL_ERROR=1`` show it).
"""


class FlipError(Exception):
    """Bad input: a setting, data or a checkpoint; the message says which and why."""


class ConfigError(FlipError, ValueError):
    """An invalid run configuration; the message names the offending key."""


class DataError(FlipError, RuntimeError):
    """The input data cannot be trained on (nothing readable, or too much of it is bad)."""


class DataPathError(DataError, ConfigError):
    """A data setting points at nothing readable (found at start-up)."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked; the message names the file."""
