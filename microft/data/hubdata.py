"""Datasets from the Hugging Face hub, without the `datasets` library: `--data ORG/NAME` reads the record
files (Parquet, JSONL, CSV, … : `formats.FORMATS`) of a dataset repo's snapshot in the local HF cache
(`$HF_HUB_CACHE/datasets--ORG--NAME/snapshots/<commit>/`, `refs/main` naming the commit), downloading it
through `huggingface_hub` first when it is not there (and the hub is reachable).

Which files: `--data-files` glob patterns (relative to the dataset's root: `data/train-*.parquet`), else the
files of `--data-split` (default `train`): those whose path names the split as a word (`train.jsonl`,
`data/train-00000-of-00001.parquet`, `train/0000.parquet`), as the hub's own file layouts do. A dataset whose
files name no split at all is read whole. The same flags pick files in a local dataset directory.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from microft.data.formats import SUFFIXES
from microft.errors import DataError, one_line
from microft.models.source import REPO_ID_RE, hub_cache_dir

DEFAULT_SPLIT = "train"
SPLIT_WORDS = ("train", "validation", "valid", "val", "test", "dev", "eval")  # words the hub's file names use


def dataset_dir(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """Where the HF cache keeps the dataset repo `repo_id`."""
    return Path(cache_dir or hub_cache_dir()) / ("datasets--" + repo_id.replace("/", "--"))


def cached_dataset(repo_id: str, revision: str = "main", cache_dir: str | Path | None = None) -> Path | None:
    """The snapshot directory of the dataset repo `repo_id` in the local HF cache, or None."""
    root = dataset_dir(repo_id, cache_dir)
    ref = root / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else None
    if commit is None and re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    snap = root / "snapshots" / commit if commit else None
    return snap if snap is not None and snap.is_dir() else None


def could_be_repo(spec: str) -> bool:
    """`ORG/NAME` that is no path on this machine and does not end like a data file."""
    return bool(REPO_ID_RE.match(spec)) and not Path(spec).exists() and not spec.lower().endswith(SUFFIXES)


def fetch_dataset(repo_id: str, patterns: list[str] | None) -> Path:
    """Download the dataset repo's record files (those of `patterns`, else every data file) into the HF
    cache with huggingface_hub; the snapshot's directory. A DataError in one line when it can't."""
    cache = hub_cache_dir()
    missing = (f"{repo_id}: no such file or directory, and no dataset of that name in the local Hugging Face "
               f"cache ({cache})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise DataError(f"{missing}; HF_HUB_OFFLINE is set, so it was not downloaded")
    try:
        from huggingface_hub import snapshot_download

        from microft.download import resolve_endpoint

        # HF_ENDPOINT read now: huggingface_hub reads it once, at import
        allow = patterns or [f"*{s}" for s in SUFFIXES]
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=allow, cache_dir=cache,
                                      endpoint=resolve_endpoint()))
    except Exception as e:  # offline, no such repo, gated: huggingface_hub's many error types
        raise DataError(f"{missing}, and downloading it failed ({one_line(e, 160)})") from None


def dataset_root(spec: str, patterns: list[str] | None = None) -> Path | None:
    """The directory of a hub dataset `spec` (cached, else downloaded); None when `spec` is a local path."""
    if not could_be_repo(spec):
        return None
    return cached_dataset(spec) or fetch_dataset(spec, patterns)


def record_files(root: Path) -> list[Path]:
    """Every record file under `root` (any depth; hidden files and directories left out), in path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if f.lower().endswith(SUFFIXES) and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def names_split(rel: str, split: str) -> bool:
    """Whether the relative path `rel` names `split` as a word: train.jsonl, data/train-00000-of-00001.parquet
    (not trainer.json)."""
    stem = rel.rsplit(".", 1)[0].lower()
    return re.search(rf"(^|[/_.-]){re.escape(split.lower())}([/_.-]|$)", stem) is not None


def pick_files(root: Path, name: str, split: str | None, patterns: list[str] | None,
               default_split: str = DEFAULT_SPLIT) -> list[Path]:
    """The record files of dataset `name` (at `root`) that `--data-files` patterns or `--data-split` pick
    (`default_split` when neither is given: `validation` for --val-data)."""
    files = record_files(root)
    if not files:
        raise DataError(f"{name}: no {', '.join(SUFFIXES)} files in it")
    rels = {f: f.relative_to(root).as_posix() for f in files}
    shown = ", ".join(list(rels.values())[:4]) + (", …" if len(rels) > 4 else "")
    if patterns:
        chosen = [f for f, r in rels.items() if any(fnmatch.fnmatch(r, p) for p in patterns)]
        if not chosen:
            raise DataError(f"{name}: no file matches --data-files {','.join(patterns)} (its files: {shown})")
        return chosen
    want = split or default_split
    chosen = [f for f, r in rels.items() if names_split(r, want)]
    if chosen:
        return chosen
    if split is None and not any(names_split(r, w) for r in rels.values() for w in SPLIT_WORDS):
        return files  # no split named anywhere: the whole dataset
    raise DataError(f"{name}: no file of split {want!r} (its files: {shown}); choose with --data-split or "
                    "--data-files")
