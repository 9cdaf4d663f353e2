"""Multi-process training on CPU (gloo, 2 ranks): the same weights as one process, exact resume, FSDP2.

Two launches keep this file fast: `microft pretrain --devices 2` through the CLI, and this file run
under torchrun as a driver (`python -m torch.distributed.run --nproc-per-node 2 tests/test_distributed.py
OUT`) that interrupts and resumes a DDP run and an FSDP run. Everything is compared with one
in-process run of micro-batch 2 × accumulation 4 on the same data and initial weights.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microft.config import RunConfig
from microft.models.config import ModelConfig
from microft.models.load import load_model, save_model
from microft.models.transformer import Transformer
from microft.runs import run_pretrain
from microft.train.distributed import Dist, grad_sync, reduce_step, strip_devices
from microft.weights import read_safetensors

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo")
SHAPE = ModelConfig(name="dist-tiny", n_layer=2, n_head=2, n_embd=16, n_positions=32)
# a Llama block (RMSNorm, RoPE, GQA, SwiGLU) for FSDP2's per-block wrap, with a tokenizer of its own
LLAMA = ModelConfig.from_preset("llama-tiny").model_copy(update={"vocab_size": 640, "n_positions": 32})
STEPS = 6


def make_inputs(root: Path) -> None:
    """A small corpus and an initial checkpoint, so every process starts from the same weights."""
    rng = random.Random(0)
    words = "the a cat dog sat on mat and ran to park with ball under tree over hill red blue big".split()
    (root / "corpus.txt").write_text(" ".join(rng.choice(words) for _ in range(1500)))
    torch.manual_seed(0)
    save_model(root / "init", Transformer(SHAPE))
    from tests.tokdirs import write_llama_dir

    save_model(root / "llama", Transformer(LLAMA))
    write_llama_dir(root / "llama")


def flags(root: Path, out: str, micro_bs: int, accum: int) -> dict:
    return dict(model=str(root / "init"), data=str(root / "corpus.txt"), out=str(root / out),
                micro_bs=micro_bs, accum=accum, max_steps=STEPS, max_seq_len=16, precision="fp32",
                device="cpu", lr=1e-3, warmup=1, val_frac=0.1, eval_every=2, save_every=3, log_format="plain")


def run_config(root: Path, out: str, micro_bs: int, accum: int, **kw) -> RunConfig:
    """What `microft pretrain` with these flags resolves to (it never groups by length)."""
    return RunConfig(**{**flags(root, out, micro_bs, accum), **kw}, group_by_length=False)


def cli_args(f: dict) -> list[str]:
    return [a for k, v in f.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(run / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, float((a[k] - b[k]).abs().max()))


def run(cmd: list[str], timeout: float = 240) -> None:
    """Run a launcher; on a hang, SIGTERM its process group so torchrun stops the ranks too."""
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        raise AssertionError(f"{cmd[:6]} hung:\n{out[-5000:]}") from None
    assert proc.returncode == 0, out[-8000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (1 process, 2 × 4) in-process, then both multi-process launches."""
    root = tmp_path_factory.mktemp("dist")
    make_inputs(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs; 2 threads on a busy 2-core box are 3x slower
    try:
        run_pretrain(run_config(root, "single", 2, 4), lambda e: None)
        run_pretrain(run_config(root, "single-llama", 2, 4, model=str(root / "llama")), lambda e: None)
    finally:
        torch.set_num_threads(threads)

    run([sys.executable, "-m", "microft", "pretrain", *cli_args(flags(root, "ddp", 2, 2)), "--devices", "2"])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
         str(root)])
    return root


def test_two_processes_of_2x2_match_one_process_of_2x4(runs):
    assert_same_weights(weights(runs / "ddp"), weights(runs / "single"))
    for name in ("metrics.jsonl",):  # rank 0 alone writes: one record per step and eval, no copies
        ref = [json.loads(line) for line in (runs / "single" / name).read_text().splitlines()]
        got = [json.loads(line) for line in (runs / "ddp" / name).read_text().splitlines()]
        assert [r["step"] for r in got] == [r["step"] for r in ref]
        for r, g in zip(ref, got, strict=True):
            key = "loss" if "loss" in r else "val_loss"
            assert g[key] == pytest.approx(r[key], abs=1e-5)
    run = json.loads((runs / "ddp" / "run.json").read_text())
    assert run["plan"] == {"micro_bs": 2, "accum": 2, "world_size": 2}
    state = torch.load(runs / "ddp" / "checkpoints" / "step-0000006" / "train_state.pt", weights_only=False)
    assert state["global_bs"] == 8
    leftovers = [p.name for p in (runs / "ddp").rglob(".*")]
    assert leftovers == []


def test_interrupted_and_resumed_torchrun_run_matches_an_uninterrupted_one(runs):
    resumed = runs / "ddp-resumed"
    assert json.loads((resumed / "interrupted.json").read_text()) == {"rank0": 130, "rank1": 143}
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    assert_same_weights(weights(resumed), weights(runs / "ddp"), atol=0)
    steps = [json.loads(line).get("step") for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6]


def test_fsdp2_on_cpu_resumes_exactly_and_its_checkpoint_loads_on_one_process(runs):
    fsdp = runs / "fsdp"
    assert json.loads((fsdp / "interrupted.json").read_text()) == {"rank0": 130, "rank1": 143}
    assert_same_weights(weights(fsdp), weights(runs / "single"))
    single = load_model(runs / "single" / "final").eval()
    loaded = load_model(fsdp / "final").eval()  # a plain, unsharded checkpoint
    x = torch.randint(0, SHAPE.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(x), single(x), atol=1e-4, rtol=0)
        sharded = torch.load(fsdp / "logits.pt")  # the sharded model's
        assert torch.allclose(loaded(x), sharded, atol=1e-5, rtol=0)
    # the optimizer state was gathered into the single-device layout: a 1-process run can resume it
    a = torch.load(fsdp / "checkpoints" / "step-0000006" / "train_state.pt", weights_only=False)["optimizer"]
    b = torch.load(runs / "single" / "checkpoints" / "step-0000006" / "train_state.pt",
                   weights_only=False)["optimizer"]
    assert a["param_groups"] == b["param_groups"]
    for i, s in b["state"].items():
        for name, t in s.items():
            assert torch.allclose(a["state"][i][name], t, atol=1e-5, rtol=0), (i, name)


def test_fsdp2_wraps_llama_blocks_and_matches_one_process(runs):
    assert_same_weights(weights(runs / "fsdp-llama"), weights(runs / "single-llama"))
    assert (runs / "fsdp-llama" / "final" / "tokenizer.json").is_file()


def test_one_process_helpers_are_no_ops():
    dist = Dist()
    with grad_sync(dist, enabled=False):
        pass
    loss, stop = reduce_step(torch.tensor(3.0), True, dist)
    assert float(loss) == 3.0 and stop
    argv = ["pretrain", "--devices", "2", "--out", "x", "--devices=4"]
    assert strip_devices(argv) == ["pretrain", "--out", "x"]


# --- the torchrun driver (each rank runs this) --------------------------------------------------
def _interrupted_then_resumed(root: Path, out: str, **kw) -> None:
    """Run to step 3, SIGINT rank 0 there, then resume with --resume auto to the end."""
    from microft.errors import Interrupted

    rank = int(os.environ["RANK"])
    cfg = run_config(root, out, 2, 2, **kw)

    def sigint_after_step_3(e: dict) -> None:  # only rank 0 receives events
        if e["kind"] == "step" and e["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    try:
        run_pretrain(cfg, sigint_after_step_3)
        raise AssertionError("the run was not interrupted")
    except Interrupted as e:
        codes = [None, None]
        torch.distributed.all_gather_object(codes, e.exit_code)
        if rank == 0:
            (root / out / "interrupted.json").write_text(json.dumps({"rank0": codes[0], "rank1": codes[1]}))
    run_pretrain(cfg.model_copy(update={"resume": "auto"}), lambda e: None)


def _fsdp_logits(root: Path) -> None:
    """The logits of the final weights computed by a sharded model, for the single-process check."""
    from microft.train.distributed import distributed

    model = load_model(root / "fsdp" / "final").eval()
    cfg = run_config(root, "fsdp", 2, 2, shard="fsdp")
    with distributed(cfg, model) as dist:
        x = torch.randint(0, SHAPE.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = dist.wrapped(x)
        if dist.is_main:
            torch.save(logits, root / "fsdp" / "logits.pt")


if __name__ == "__main__":
    root = Path(sys.argv[1])
    # one group for all the runs (gloo can't re-init reliably); a hang fails after 2 minutes
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    _interrupted_then_resumed(root, "ddp-resumed")
    _interrupted_then_resumed(root, "fsdp", shard="fsdp")
    _fsdp_logits(root)
    run_pretrain(run_config(root, "fsdp-llama", 2, 2, shard="fsdp", model=str(root / "llama")),
                 lambda e: None)
    torch.distributed.destroy_process_group()
