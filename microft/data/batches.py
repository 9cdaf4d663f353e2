"""Training data: text packing, the step sampler, micro-batch splitting and collation.

A *sample* is `{"input_ids": [...], "labels": [...], "weight": float}` with labels already
shifted (labels[t] is the target after input_ids[:t+1]; -100 is ignored). Which samples form
an optimizer step depends only on the seed, the epoch and the global batch size; the step is
then split into micro-batches, so the micro-batch size never changes what a step sees.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from microft.errors import DataError, check_data_path
from microft.models.config import EOT_TOKEN, IGNORE_INDEX

Sample = dict[str, Any]


def read_text_corpus(path: str | Path) -> list[str]:
    """Documents from a text file (one document) or a directory of `.txt` files (sorted, recursive)."""
    p = Path(path)
    check_data_path(p, f"data not found: {p}")
    if p.is_dir():
        try:
            os.listdir(p)  # rglob would pass over an unreadable directory in silence
            files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        except OSError as e:
            raise DataError(f"{p}: can't read the directory ({e.strerror})") from None
        if not files:
            raise DataError(f"no .txt files in directory {p}")
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"data not found: {p}")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text (byte {e.start}); convert it with iconv first") from None
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror}") from None
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"{p}: no text (all files are empty)")
    return docs


class TokenBlocks(Sequence):
    """Fixed-length language-modelling samples over one token stream (documents joined by <|endoftext|>)."""

    def __init__(self, tokens: torch.Tensor, block_size: int):
        self.tokens, self.block_size = tokens, block_size
        self.n = (len(tokens) - 1) // block_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        chunk = self.tokens[i * self.block_size : (i + 1) * self.block_size + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:], "weight": 1.0}


def pack_documents(docs: list[str], encode: Callable[[str], list[int]], block_size: int,
                   eos_id: int = EOT_TOKEN) -> TokenBlocks:
    """Tokenise documents, end each with `eos_id` (GPT-2's <|endoftext|>), and cut the stream into blocks."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(encode(doc))
        ids.append(eos_id)
    if len(ids) < block_size + 1:
        raise DataError(f"corpus has {len(ids)} tokens, fewer than one block of {block_size + 1}; "
                        f"use a smaller --max-seq-len or more text")
    return TokenBlocks(torch.tensor(ids, dtype=torch.long), block_size)


class Subset(Sequence):
    def __init__(self, base: Sequence, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        return self.base[self.indices[i]]


def split_indices(n: int, val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/val split of range(n); at least one val item when val_frac > 0."""
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    n_val = 0 if val_frac <= 0 else max(1, round(n * val_frac))
    if n_val >= n:
        raise DataError(f"only {n} samples: too few to hold out a validation split of {val_frac:.0%}")
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def sample_length(s: Sample) -> int:
    return len(s["input_ids"])


def epoch_batches(n: int, global_bs: int, seed: int, epoch: int, lengths: list[int] | None = None,
                  shuffle: bool = True) -> list[list[int]]:
    """The global batches of one epoch (sample indices), from the seed, epoch and global batch only.

    With `lengths`, samples are grouped by length: a shuffled pool of 16 global batches is
    sorted by length and cut into batches, and the batch order is shuffled again, so steps
    carry similar lengths (little padding) while staying random across the epoch. Without
    `shuffle` (--no-shuffle) the samples keep their order: step k takes samples
    k*global_bs .. (k+1)*global_bs - 1 in every epoch, whatever `lengths` says.
    """
    if not shuffle:
        return [list(range(s, s + global_bs)) for s in range(0, n - global_bs + 1, global_bs)]
    rng = random.Random(f"{seed}-{epoch}")
    perm = list(range(n))
    rng.shuffle(perm)
    if lengths is not None:
        pool = 16 * global_bs
        perm = [i for s in range(0, n, pool) for i in sorted(perm[s : s + pool], key=lambda i: -lengths[i])]
    batches = [perm[s : s + global_bs] for s in range(0, n - global_bs + 1, global_bs)]
    if lengths is not None:
        rng.shuffle(batches)
    return batches


def micro_batches(step_indices: list[int], lengths: list[int], micro_bs: int) -> list[list[int]]:
    """Split one step's samples into micro-batches of similar length (longest first)."""
    order = sorted(step_indices, key=lambda i: (-lengths[i], i))
    return [order[s : s + micro_bs] for s in range(0, len(order), micro_bs)]


def pack_rows(indices: list[int], lengths: list[int], max_len: int) -> list[list[int]]:
    """Whole samples packed into rows of at most `max_len` tokens (first-fit decreasing).

    Deterministic in the indices and lengths only; rows come longest first, and within a row
    the samples keep the order they were placed in.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > max_len:
            raise DataError(f"sample {i} has {n} tokens, more than the packed row length {max_len}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_len - n)
    order = sorted(range(len(rows)), key=lambda r: (free[r], r))
    return [rows[r] for r in order]


def packed_micro_batches(step_indices: list[int], lengths: list[int], micro_bs: int, max_len: int,
                         world_size: int = 1) -> list[list[list[int]]]:
    """One step's samples as packed micro-batches: lists of `micro_bs` rows, each row a list of samples.

    The step's samples are first dealt to ranks (longest first, round robin, the split
    `micro_batches` makes), then each rank's share is packed into rows, so every rank has at
    least one micro-batch, and the rows never depend on the micro-batch size: 8 rows x 1 and
    2 rows x 4 see the same rows. Rank r's micro-batches are `result[r::world_size]`, so the
    list interleaves ranks (empty micro-batches fill in where one rank has fewer).
    """
    order = sorted(step_indices, key=lambda i: (-lengths[i], i))
    per_rank = []
    for r in range(world_size):
        rows = pack_rows(order[r::world_size], lengths, max_len)
        per_rank.append([rows[s : s + micro_bs] for s in range(0, len(rows), micro_bs)])
    n = max(len(m) for m in per_rank)
    return [per_rank[r][k] if k < len(per_rank[r]) else [] for k in range(n) for r in range(world_size)]


class Batch(NamedTuple):
    """A collated micro-batch. `target_pos` lists the flat positions that are targets when they
    are sparse (prompt-masked data), so the loss head runs on those rows only."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None
    target_pos: torch.Tensor | None
    position_ids: torch.Tensor | None = None  # packed rows only: positions restart at each sample

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) if t is not None else None for t in self))

    def pin(self) -> Batch:
        """Page-locked host copies, so `to(cuda)` is an asynchronous copy."""
        return Batch(*(t.pin_memory() if t is not None else None for t in self))


class StepFeed:
    """Builds the next optimizer step's batches on a background thread while this step computes.

    `build(step, plan)` must be deterministic (microft's step plans are: seeded by step and
    epoch). A request for another (step, plan) than the one prepared — a resume, or a halved
    micro-batch after an out-of-memory retry — waits for the stale build, then builds anew.
    """

    def __init__(self, build: Callable[[int, Any], Any]):
        from concurrent.futures import ThreadPoolExecutor

        self._build = build
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="microft-batches")
        self._next: tuple[int, Any, Any] | None = None

    def get(self, step: int, plan: Any, last: bool = False) -> Any:
        """The batches of `step`; unless it is the `last`, start building the next step's."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == step and ahead[1] == plan:
            result = ahead[2].result()
        else:
            if ahead is not None:
                ahead[2].exception()  # let it finish: builds share state (the epoch cache)
            result = self._build(step, plan)
        if not last:
            self._next = (step + 1, plan, self._pool.submit(self._build, step + 1, plan))
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def collate(samples: list[Sample], pad_id: int = 0, sparse_below: float = 0.9) -> Batch:
    """Right-pad a micro-batch; per-token weights only when some weight isn't 1.

    Padding sits after every real token and is never a target, so under causal attention its
    value can't affect the loss; token 0 is valid for any vocabulary. When fewer than
    `sparse_below` of the positions are targets, their flat indices are computed here, on the
    host, so the model can skip the rest without a device sync.
    """
    T = max(sample_length(s) for s in samples)
    B = len(samples)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    weighted = any(float(s.get("weight", 1.0)) != 1.0 for s in samples)
    w = torch.ones((B, T), dtype=torch.float32) if weighted else None
    for b, s in enumerate(samples):
        n = sample_length(s)
        x[b, :n] = torch.as_tensor(s["input_ids"])
        y[b, :n] = torch.as_tensor(s["labels"])
        if w is not None:
            w[b] = float(s.get("weight", 1.0))
    valid = (y != IGNORE_INDEX).view(-1)
    pos = valid.nonzero().squeeze(1) if valid.sum() < sparse_below * valid.numel() else None
    return Batch(x, y, w, pos)


def collate_packed(rows: list[list[Sample]], pad_id: int = 0, sparse_below: float = 0.9) -> Batch:
    """Collate packed rows (each a list of whole samples) into one micro-batch, right-padded.

    `position_ids` restart at 0 for each sample (and for the padding, a sample of its own
    that is never a target), which is also what confines attention to each sample.
    """
    flat = []
    for row in rows:
        ids = [t for s in row for t in torch.as_tensor(s["input_ids"]).tolist()]
        labels = [t for s in row for t in torch.as_tensor(s["labels"]).tolist()]
        pos = [p for s in row for p in range(sample_length(s))]
        weights = [float(s.get("weight", 1.0)) for s in row for _ in range(sample_length(s))]
        flat.append({"input_ids": ids, "labels": labels, "pos": pos, "w": weights})
    T = max(len(r["input_ids"]) for r in flat)
    b = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in flat], pad_id, sparse_below)
    p = torch.zeros((len(flat), T), dtype=torch.long)
    weighted = any(w != 1.0 for r in flat for w in r["w"])
    w = torch.ones((len(flat), T), dtype=torch.float32) if weighted else None
    for i, r in enumerate(flat):
        p[i, : len(r["pos"])] = torch.tensor(r["pos"], dtype=torch.long)
        if w is not None:
            w[i, : len(r["w"])] = torch.tensor(r["w"])
    return Batch(b.input_ids, b.labels, w, b.target_pos, p)


def target_weight(samples: list[Sample]) -> float:
    """Sum of token weights over target (non-ignored) positions: the step's loss denominator."""
    total = 0.0
    for s in samples:
        labels = torch.as_tensor(s["labels"])
        total += float(s.get("weight", 1.0)) * int((labels != IGNORE_INDEX).sum())
    return total
