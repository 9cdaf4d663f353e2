"""The run's event stream: the loop writes nothing itself; metrics.jsonl, summary.json and the plot are
sinks, and a new sink is one entry in `train.sinks.SINKS`."""

from __future__ import annotations

import json

from microft.config import BatchPlan
from microft.train import sinks
from microft.train.loop import train
from tests.helpers import masked_samples, run_config, tiny_model


class Recorder:
    """A sink that keeps what it is given (a tracker would send it on)."""

    seen: list[dict] = []
    closed = 0

    def __init__(self, ctx: sinks.SinkContext):
        Recorder.ctx = ctx

    def __call__(self, e):
        Recorder.seen.append(dict(e))

    def close(self):
        Recorder.closed += 1


def test_a_registered_sink_gets_the_stream_and_the_files_match_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sinks.SINKS, "recorder", Recorder)
    Recorder.seen, Recorder.closed = [], 0
    cfg = run_config(tmp_path, max_steps=6).model_copy(update={"eval_every": 3, "log_every": 2})
    console: list[dict] = []
    summary = train(tiny_model(), masked_samples(12, seed=1, max_len=12),
                    masked_samples(4, seed=2, max_len=12), cfg, BatchPlan(micro_bs=1, accum=2),
                    console.append)
    assert Recorder.closed == 1 and Recorder.ctx.config["plan"]["accum"] == 2  # hyper-parameters for trackers
    kinds = [e["kind"] for e in Recorder.seen]
    assert kinds.count("step") == 6 and kinds.count("eval") == 3 and kinds[-1] == "summary"
    assert "banner" in kinds
    # the console comes after the sinks: it sees the plot's path (or the hint) the summary sink added
    assert console[-1] is summary and ("plot" in summary or "plot_missing" in summary)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6]  # --log-every 2 (and the last step)
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 3, 6]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 6 and "plot" not in saved


def test_a_resumed_run_keeps_each_step_once(tmp_path):
    cfg = run_config(tmp_path, max_steps=4).model_copy(update={"eval_every": 0, "save_every": 2})
    data = masked_samples(12, seed=1, max_len=12)
    train(tiny_model(), data, None, cfg, BatchPlan(micro_bs=1, accum=1))
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a run killed mid-write leaves a torn line
        f.write('{"step": 5, "lo')
    notes: list[str] = []
    longer = cfg.model_copy(update={"max_steps": 6, "resume": "auto"})
    train(tiny_model(), data, None, longer, BatchPlan(micro_bs=1, accum=1),
          lambda e: e["kind"] == "note" and notes.append(e["text"]))
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and any("torn line" in n for n in notes)
