"""A run's output directory: one owner at a time, no earlier run overwritten, nothing half-made left.

`owned_out(cfg, on_event)` wraps a whole run (runs.py). It checks that `--out` can be a directory,
takes `OUT/.microft.lock` atomically (pid, host, start time; a dead process's lock on this host
is reclaimed with a note, a live one is refused naming its owner), refuses an `--out` that holds
an earlier run unless `--resume` is given, tidies what a killed run left (temporary and
half-pruned checkpoint directories), and turns SIGINT/SIGTERM before the first step into exit
130/143 with `--out` left as it was found. The lock goes when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from microft.errors import ConfigError, Interrupted, defer_in_import, drop_deferred, one_line, signal_received

LOCK = ".microft.lock"
# what a microft run writes into --out: any of them means the directory holds a run
RUN_FILES = ("run.json", "metrics.jsonl", "summary.json", "checkpoints", "final", "best", "predictions.jsonl",
             "learning_curve.png")
TEMP_PREFIXES = (".tmp-", ".old-", ".trash-")


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so a reused pid is not taken for the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _owner(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}"


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's contents; None when it is empty or torn (a writer killed between create and write)."""
    for _ in range(5):  # a lock just created may not hold its line yet
        try:
            info = json.loads(path.read_text())
            if isinstance(info, dict):
                return info
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return None


def take_lock(out: Path, note: Callable[[str], None]) -> Path:
    """Create OUT/.microft.lock with O_CREAT|O_EXCL; reclaim a dead owner's lock on this host."""
    path = out / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "proc_start": _proc_start(os.getpid())}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = _read_lock(path)
            except FileNotFoundError:
                continue  # its owner just finished: try again
            if info is not None and (info.get("host") != me["host"] or _alive(int(info.get("pid", -1)),
                                                                             info.get("proc_start"))):
                where = ("" if info.get("host") == me["host"]
                         else " (another host: if that run is gone, delete the lock)")
                raise ConfigError(f"{out} is in use by another microft run ({_owner(info)}){where}; "
                                  f"wait for it or choose another --out") from None
            aside = out / f"{LOCK}.stale-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, aside)  # one rename: of two reclaimers, only one moves the stale lock
                aside.unlink()
                note("reclaimed the lock of a run that is gone "
                     f"({_owner(info) if info else 'lock file torn'})")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        return path
    raise ConfigError(f"could not take the lock {path}: other runs keep taking it")


def release_lock(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def earlier_run(out: Path) -> list[str]:
    """The microft files in `out` that show an earlier run."""
    return [n for n in RUN_FILES if (out / n).exists()] if out.is_dir() else []


def _check_path(out: Path) -> None:
    """`--out` must be a directory or creatable as one; one line for a file in the way."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out} lies under {parent}, which is a file; choose a directory")
            return


def _topmost_missing(out: Path) -> Path | None:
    """The topmost directory that creating `out` will make (None: `out` exists)."""
    missing = [p for p in [out, *out.parents] if not p.exists()]
    return missing[-1] if missing else None


def _make_dirs(out: Path) -> None:
    """Create `out` and missing parents."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {out}: {e.strerror or one_line(e)}") from None


def _remove_empty(out: Path, top: Path) -> None:
    """Remove `out` and its parents up to `top` while they are empty (what a start-up cut short made)."""
    for d in [out, *out.parents]:
        try:
            d.rmdir()
        except OSError:
            return
        if d == top:
            return


def check_written_dir(out: str | Path, force: bool) -> None:
    """Before a command that writes one directory (export, merge) reads anything: one line for a file in the
    way or an earlier non-empty directory without `force`."""
    out = Path(out)
    _check_path(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def writing(out: str | Path) -> Iterator[None]:
    """A directory's write: a place it cannot write (permissions, a full disk) is one line, no traceback."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"cannot write --out {out}: {e.strerror or one_line(e)}") from None


def tidy(out: Path, note: Callable[[str], None]) -> None:
    """Remove what killed runs left: temporary dirs and half-pruned checkpoints; restore a moved-aside dir.

    Runs only under the lock, so no other run's temporary directories are touched.
    """
    from microft.train.checkpoint import complete

    for d in (out, out / "checkpoints"):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if not p.name.startswith(TEMP_PREFIXES):
                continue
            # atomic_dir moved `name` aside and was killed before the new one landed
            if p.name.startswith(".old-"):
                name = p.name[len(".old-"):].rsplit("-", 1)[0]
                if not (d / name).exists():
                    os.replace(p, d / name)
                    note(f"restored {d / name} from an interrupted save")
                    continue
            shutil.rmtree(p, ignore_errors=True)
            note(f"removed {p.name} left by an interrupted run")
        if d.name == "checkpoints":
            for p in sorted(d.glob("step-*")):
                if p.is_dir() and not complete(p):
                    shutil.rmtree(p, ignore_errors=True)
                    note(f"removed {p}: a checkpoint without its files (a run was killed while pruning)")


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def _startup_signals(got: dict[str, int]) -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (also where the shell started us with SIGINT ignored)."""
    def handler(num: int, frame: Any) -> None:
        got.setdefault("sig", num)
        if not defer_in_import(num, frame):
            raise KeyboardInterrupt

    try:
        prev = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in prev:
            signal.signal(s, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, h in prev.items():
            signal.signal(s, h)


@contextlib.contextmanager
def owned_out(cfg: Any, on_event: Callable[[dict[str, Any]], None]
              ) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Own `cfg.out` for the run inside; yields the event sink to use (it notes when step 1 is done)."""
    out = Path(cfg.out)
    progress = {"step": False}

    def note(text: str) -> None:
        on_event({"kind": "note", "text": text})

    def emit(e: dict[str, Any]) -> None:
        if not progress["step"] and (got or signal_received()):  # an interrupt that C code swallowed
            drop_deferred()
            raise KeyboardInterrupt
        if e.get("kind") == "step":
            progress["step"] = True
        on_event(e)

    got: dict[str, int] = {}
    if signal_received():  # Ctrl-C while the command line started: nothing is written
        raise Interrupted(f"interrupted before step 1; nothing was saved and {out} is as it was", 130)
    _check_path(out)
    if not _is_main():  # rank 0 owns the directory; the others only refuse an earlier run, as it does
        if not cfg.resume and earlier_run(out):
            raise ConfigError(f"{out} already holds a run; continue it with --resume auto, or choose a "
                              "new --out")
        yield emit
        return
    with _startup_signals(got):
        made = _topmost_missing(out)  # known before it is made, so a signal in between leaves nothing
        lock = None
        try:
            _make_dirs(out)
            before = set(os.listdir(out))
            try:
                lock = take_lock(out, note)
            except OSError as e:
                raise ConfigError(f"cannot write to --out {out}: {e.strerror or one_line(e)}") from None
            found = earlier_run(out)
            if found and not cfg.resume:
                raise ConfigError(f"{out} already holds a run ({', '.join(found)}); continue it with "
                                  f"--resume auto, or choose a new --out")
            tidy(out, note)
            yield emit
        except BaseException as e:
            if not progress["step"] and lock is not None:  # nothing trained: leave --out as it was found
                # (never without the lock: the files may be another run's)
                _roll_back(out, made, before, lock)
            elif not progress["step"] and made is not None:
                _remove_empty(out, made)
            # after a signal, whatever breaks (a half-imported module) is the interrupt's doing, not a bug
            interrupted = isinstance(e, KeyboardInterrupt) or (bool(got or signal_received())
                                                                and isinstance(e, Exception))
            if interrupted and not progress["step"]:
                code = 143 if got.get("sig") == signal.SIGTERM else 130
                raise Interrupted(f"interrupted before step 1; nothing was saved and {out} is as it was",
                                  code) from None
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted(f"interrupted; continue with --resume auto (--out {out})",
                                  143 if got.get("sig") == signal.SIGTERM else 130) from None
            raise
        finally:
            if lock is not None:
                release_lock(lock)


def _roll_back(out: Path, made: Path | None, before: set[str], lock: Path | None) -> None:
    """Remove what this run created in `out` (all of it, when it created `out` itself)."""
    if made is not None:
        if lock is not None:
            release_lock(lock)
        shutil.rmtree(made, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        for name in set(os.listdir(out)) - before - {LOCK}:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
