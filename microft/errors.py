"""User-facing error types. The CLI turns each into one line on stderr and its exit code."""

import os
import threading
from types import FrameType


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


class Interrupted(MicroftError):
    """SIGINT/SIGTERM: the run saved a checkpoint (or, before step 1, nothing) and stopped; exit 130 or 143.
    Not an error: the CLI prints its message without `error:`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# SIGINTs the command line's own handler saw (cli.main installs it before anything heavy is imported)
_SIGNALS: dict[str, int] = {}


def record_signal(num: int, frame: FrameType | None) -> None:
    """The CLI's SIGINT handler until a run installs its own: remember the signal, then raise
    KeyboardInterrupt as Python's handler does (once no module is being imported: see `defer_in_import`).
    The record outlives a KeyboardInterrupt that C code swallows (torch's numpy bridge clears the error of
    an interrupted `import numpy` and goes on)."""
    _SIGNALS.setdefault("sig", num)
    if not defer_in_import(num, frame):
        raise KeyboardInterrupt


def defer_in_import(num: int, frame: FrameType | None, every: float = 0.05) -> bool:
    """True, and the signal sent again in `every` seconds, while a module is being imported below `frame`.

    An exception raised in Python code that C++ called while an extension initialises (torch's pybind11
    start-up calls back into Python) can't unwind through it: the process aborts (exit -6, `terminate
    called after throwing pybind11::error_already_set`). So a signal handler that would raise waits until
    the import is done; the signal comes back to whichever handler is in place then, unless code that saw
    it recorded (`signal_received`, `drop_deferred`) has acted on it first."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            _DEFERRED.add(num)
            timer = threading.Timer(every, _send_again, (num,))
            timer.daemon = True
            timer.start()
            return True
        frame = frame.f_back
    _DEFERRED.discard(num)
    return False


_DEFERRED: set[int] = set()  # signals `defer_in_import` will send again


def _send_again(num: int) -> None:
    if num in _DEFERRED:
        os.kill(os.getpid(), num)


def drop_deferred() -> None:
    """The code acting on a recorded signal: a deferred one is not sent again."""
    _DEFERRED.clear()


def signal_received() -> int | None:
    """The signal `record_signal` saw in this process, if any. Whoever asks acts on it (stops): a deferred
    copy is not sent again."""
    num = _SIGNALS.get("sig")
    if num:
        drop_deferred()
    return num


def one_line(e: BaseException, limit: int | None = 160) -> str:
    """An exception's message on one line (cut to `limit` characters), for error messages."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def check_data_path(path: os.PathLike, missing: str) -> None:
    """Raise DataError with the real reason `path` can't be reached: `missing` when it does not exist,
    else the system's (permission denied, a symlink loop)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise DataError(missing) from None
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from None
