"""User-facing error types. The CLI turns each into one line on stderr and its exit code."""


class MicroftError(Exception):
    """A problem with the user's input or environment; never a bug. Exit code 2."""

    exit_code = 2


class ConfigError(MicroftError):
    """Flags, recipes or presets that don't make a valid run."""


class DataError(MicroftError):
    """Training or evaluation data that can't be read or is malformed."""


class CheckpointError(MicroftError):
    """A checkpoint that is missing, corrupt, or doesn't match the run."""


class DownloadError(MicroftError):
    """A model download that failed (offline, bad hash, missing file)."""


class TrainingError(MicroftError):
    """A run that stopped itself: non-finite loss, out of memory."""

    exit_code = 1
