"""The demo dataset: deterministic, correct answers, held-out items disjoint from training."""

from __future__ import annotations

import re

import pytest

from microft.config import RunConfig
from microft.demo import (
    DEMO_RUN,
    TASKS,
    demo_heldout,
    demo_records,
    exact_match,
    exact_match_by_task,
    is_heldout,
    task_of,
)
from microft.instruct import Record, build_samples
from microft.templates import BUILTIN_TEMPLATES
from microft.tokenizer import encode


def check_answer(rec: Record) -> None:
    """Recompute the answer of a demo item from its question."""
    task = task_of(rec.source)
    if task in ("add", "sub"):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", rec.instruction).groups()
        assert rec.output == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert (op == "+") == (task == "add") and int(rec.output) >= 0
    elif task == "reverse":
        assert rec.output.split() == rec.input.split()[::-1] and 3 <= len(rec.input.split()) <= 5
    elif task == "sort":
        nums = [int(x) for x in rec.input.split()]
        assert rec.output == " ".join(str(x) for x in sorted(nums)) and 3 <= len(nums) <= 5
    elif task == "passive":
        subj, verb, obj = re.fullmatch(r"The (\w+) (\w+) the (\w+)\.", rec.input).groups()
        m = re.fullmatch(r"The (\w+) was (\w+) by the (\w+)\.", rec.output)
        assert m and (m[1], m[3]) == (obj, subj) and subj != obj
    elif task == "upper":
        assert rec.output == rec.input.upper() and rec.output != rec.input
    else:
        raise AssertionError(f"unknown task in {rec.source}")


def key(rec: Record) -> tuple[str, str, str]:
    return task_of(rec.source), rec.instruction, rec.input


def test_deterministic():
    assert demo_records(300, seed=1) == demo_records(300, seed=1)
    assert demo_records(300, seed=1) != demo_records(300, seed=2)
    assert demo_heldout(60, seed=1) == demo_heldout(60, seed=1)


def test_answers_are_correct():
    recs = demo_records(1200, seed=0) + demo_heldout(120, seed=0)
    for rec in recs:
        check_answer(rec)
    assert {task_of(r.source) for r in recs} == set(TASKS)


def test_balanced_task_mix():
    recs = demo_records(600, seed=5)
    counts = {t: sum(task_of(r.source) == t for r in recs) for t in TASKS}
    assert set(counts.values()) == {100}


def test_heldout_disjoint_from_any_training_set():
    held = demo_heldout(120, seed=0)
    assert len({key(r) for r in held}) == 120  # no repeats in the evaluation set
    train_keys = {key(r) for seed in (0, 1, 2) for r in demo_records(2000, seed)}
    assert not train_keys & {key(r) for r in held}
    assert all(is_heldout(*key(r)) for r in held)


def test_tasks_subset_and_unknown():
    recs = demo_records(10, seed=0, tasks=["reverse"])
    assert {task_of(r.source) for r in recs} == {"reverse"}
    with pytest.raises(ValueError, match="unknown demo task"):
        demo_records(10, tasks=["poetry"])


def test_exact_match():
    assert exact_match([" 7 19  42\n", "stone"], ["7 19 42", "STONE"]) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])
    recs = demo_records(12, seed=0)
    scores = exact_match_by_task([r.output for r in recs[:6]] + ["x"] * 6, recs)
    assert scores["all"] == 0.5 and set(scores) == set(TASKS) | {"all"}


def test_demo_items_feed_the_pipeline():
    samples, stats = build_samples(demo_records(60, seed=0), "alpaca", encode, max_seq_len=128)
    assert stats.n_samples == 60 and stats.n_truncated == 0
    assert stats.max_len < 80  # short items: a tiny model trains on them quickly
    assert all(s["labels"][-1] == 50256 for s in samples)


def test_demo_run_settings_are_a_valid_config():
    cfg = RunConfig(**DEMO_RUN)
    assert cfg.template in BUILTIN_TEMPLATES and cfg.data is None
    samples, stats = build_samples(demo_records(600, seed=0), cfg.template, encode, cfg.max_seq_len)
    assert stats.n_truncated == 0 and stats.max_len <= 32
