"""Preference tuning vs TRL's DPOTrainer: tokens/s and peak RSS of `microft dpo` and TRL, full and LoRA.

    .venv/bin/python bench/dpo.py              # the measurement: writes "## DPO vs TRL" in docs/benchmarks.md
    .venv/bin/python bench/dpo.py --no-write   # print the section instead
    .venv/bin/python bench/dpo.py --steps 2    # a smoke run of the script

A random-weight Qwen3-shaped model (built with transformers, saved with save_pretrained, a small BPE tokenizer
beside it: the test suite's, `tests/tokdirs.py`) and the same pairs for both, in file order, the same batch,
sigmoid DPO with beta 0.1, SGD at a constant lr, fp32, no gradient checkpointing. Each configuration runs in a
fresh process, one after another: microft through its CLI (`microft dpo`, its summary's tokens/s while
training), TRL's `DPOTrainer` (the same PEFT LoRA, or full fine-tuning with its frozen reference copy; its
tokens/s over the optimizer steps, timed by a callback, after the first step as for microft's warm-up). Tokens
are the pairs' chosen and rejected sequences, prompt included, counted the same way for both. Peak RSS is the
process's maximum resident set (ru_maxrss): Python, torch and the libraries included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_section import publish  # noqa: E402
from harness import DOC, ROOT, command_line, gib, load_average, machine, table  # noqa: E402

HEADING = "## DPO vs TRL"
SHAPE = dict(vocab_size=640, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
             tie_word_embeddings=True)
# runs argv[1:] as its only child and prints the child's peak RSS (KiB, Linux's ru_maxrss) on stderr
MAXRSS_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                  "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                  "sys.exit(r.returncode)")
WORDS = "red green blue cat dog sun moon tree river stone light night".split()


def build(root: Path, n_pairs: int) -> tuple[Path, Path, Path]:
    """(model directory, pairs file, verbatim template file) under `root`."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests.tokdirs import write_qwen_dir

    torch.manual_seed(0)
    model_dir = root / "model"
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE)).save_pretrained(model_dir)
    write_qwen_dir(model_dir)
    rows = []
    for i in range(n_pairs):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(40)]
        rows.append({"prompt": "Repeat these words: " + " ".join(words[:20]) + ".\n",
                     "chosen": " ".join(words[:20]), "rejected": " ".join(reversed(words[:24]))})
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = root / "verbatim.json"
    template.write_text(json.dumps({"name": "verbatim", "prompt": "{instruction}{input}",
                                    "prompt_no_input": "{instruction}"}))
    return model_dir, data, template


def run_microft(a, model_dir: Path, data: Path, template: Path, lora: bool, out: Path) -> dict:
    cmd = [str(Path(sys.executable).with_name("microft")), "dpo", "--model", str(model_dir), "--data",
           str(data), "--template", str(template), "--micro-bs", str(a.micro_bs), "--accum", "1",
           "--max-steps", str(a.steps + 1), "--optimizer", "sgd", "--momentum", "0", "--weight-decay", "0",
           "--schedule", "constant", "--lr", "1e-3", "--precision", "fp32", "--device", "cpu", "--no-shuffle",
           "--val-frac", "0", "--eval-every", "0", "--log-format", "json", "--out", str(out)]
    if lora:
        cmd += ["--lora", "--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "all"]
    proc = subprocess.run([sys.executable, "-c", MAXRSS_WRAPPER, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    events = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    first, *steps = [e for e in events if e["kind"] == "step"]  # the first step is the warm-up
    rss = int(next(ln for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS")).split()[1]) * 1024
    banner = next(e for e in events if e["kind"] == "banner")
    return {"tokens_per_sec": sum(e["tokens"] - p["tokens"] for p, e in zip(steps, steps[1:])) /
            sum(e["step_time"] for e in steps[1:]) if len(steps) > 1 else steps[0]["tokens_per_sec"],
            "peak_rss": rss, "trainable": banner["params_trainable"],
            "tokens_per_side": first["tokens"] / (2 * a.micro_bs)}


def trl_child(a) -> None:
    """In a fresh process: TRL's DPOTrainer on the same model, data and batch; prints one JSON record."""
    import datasets
    import torch
    import transformers
    import trl

    rows = [json.loads(ln) for ln in Path(a.data).read_text().splitlines()]
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    peft_config = None
    if a.lora:
        import peft

        peft_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    args = trl.DPOConfig(output_dir=a.out, per_device_train_batch_size=a.micro_bs,
                         gradient_accumulation_steps=1, max_steps=a.steps + 1, learning_rate=1e-3,
                         lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
                         beta=0.1, bf16=False, gradient_checkpointing=False, report_to="none",
                         logging_steps=1, save_strategy="no", use_cpu=True,
                         train_sampling_strategy="sequential", max_length=None, disable_tqdm=True)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, peft_config=peft_config, callbacks=[Timer()])
    ds = trainer.train_dataset
    lengths = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds]
    trainer.train()
    step_tokens = [sum(lengths[s * a.micro_bs:(s + 1) * a.micro_bs]) for s in range(a.steps + 1)]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(json.dumps({"tokens_per_sec": sum(step_tokens[1:]) / sum(times[1:]), "trainable": trainable,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_trl(a, model_dir: Path, data: Path, lora: bool, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--trl-child", "--model", str(model_dir), "--data", str(data), "--out",
           str(out), "--micro-bs", str(a.micro_bs), "--steps", str(a.steps)] + (["--lora"] if lora else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps after one warm-up step")
    p.add_argument("--micro-bs", type=int, default=4)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_child:
        return trl_child(a)
    rows, per_side = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data, template = build(root, a.micro_bs * (a.steps + 1))
        for lora in (False, True):
            what = "LoRA r=16, every linear" if lora else "full fine-tuning"
            mine = run_microft(a, model_dir, data, template, lora, root / f"mft-{lora}")
            theirs = run_trl(a, model_dir, data, lora, root / f"trl-{lora}")
            ratio, per_side = mine["tokens_per_sec"] / theirs["tokens_per_sec"], mine["tokens_per_side"]
            rows.append([f"microft dpo, {what}", f"{mine['trainable'] / 1e6:.2f}M", gib(mine["peak_rss"]),
                         f"{mine['tokens_per_sec']:,.0f}", f"{ratio:.2f}× TRL's tokens/s"])
            rows.append([f"TRL DPOTrainer, {what}" + (" (PEFT)" if lora else ""),
                         f"{theirs['trainable'] / 1e6:.2f}M", gib(theirs["peak_rss"]),
                         f"{theirs['tokens_per_sec']:,.0f}", ""])
    import trl

    body = (f"Command: {command_line()} · {time.strftime('%Y-%m-%d %H:%M')} · load average at the end "
            f"{load_average()}\n\nMachine: {machine('cpu')}; trl {trl.__version__}\n\n"
            f"Qwen3-shaped random model (hidden {SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers, "
            f"vocab {SHAPE['vocab_size']}), {a.micro_bs} pairs a step ({per_side:.0f} tokens a side on "
            f"average, prompt included), sigmoid DPO beta 0.1, SGD, fp32, 1 warm-up + {a.steps} timed steps, "
            "each configuration in a fresh process; the reference policy is the base with the adapters off "
            "(LoRA) or a frozen copy (full) for both. Peak RSS includes Python, torch and each tool's "
            "imports (TRL's: datasets, accelerate). On a machine shared with other jobs (the load average "
            "above) the tokens/s ratios move by tens of percent from run to run.\n\n"
            + table(["configuration", "trainable", "peak RSS", "tokens/s", "note"], rows))
    publish(DOC, HEADING, body, not a.no_write, "dpo")


if __name__ == "__main__":
    main()
