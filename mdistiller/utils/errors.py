"""Errors a user can fix.

Anything raised as a `UserError` is a problem with the user's input (a config key, a path, a checkpoint),
not a bug. The command-line tools print it as one line and exit with code 2 instead of a traceback, so the
message must name the problem and the fix.
"""


class UserError(Exception):
    """Bad input the user can correct; shown as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(UserError):
    """A dataset is missing, incomplete or in an unexpected format."""


class CheckpointError(UserError):
    """A checkpoint is missing or does not fit the model it is loaded into."""


class TrainingDivergedError(UserError):
    """The loss, a gradient or the weights stopped being finite; the run stopped before saving them. Exit code 5
    (not 2): the input was valid, the training it describes diverged."""

    exit_code = 5
