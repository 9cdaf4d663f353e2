"""The batch planner: the largest micro-batch that fits a GPU, per strategy, and the OOM decision tree.

Also what a run asks of the estimator (runs.py hands it to the loop): `auto_batch_plan` (`--micro-bs auto`,
here only: finetune, pretrain, dpo and estimate-mem all ask it), `plan_advice` (the out-of-memory message)
and `estimate_for_run` (the banner and the summary). Each plans the step of its `method`: "sft" (finetune's
and pretrain's) or "dpo" (`microft dpo`'s preference step, `with_method`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from microft.config import BatchPlan, RunConfig, resolve_batch_plan
from microft.errors import ConfigError
from microft.memory.estimate import (
    Budget,
    Estimate,
    GiB,
    estimate,
    resolve_precision,
    scale_out,
    setup_for,
    trace,
    with_dropout,
)
from microft.memory.replay import Setup
from microft.models.config import ModelConfig


# --- the planner -------------------------------------------------------------------------------
@dataclass
class StrategyFit:
    """One strategy on a budget: the largest micro-batch that fits and what the step costs."""

    strategy: str
    setup: Setup  # at the chosen micro-batch
    micro_bs: int  # 0: nothing fits
    accum: int
    peak_bytes: int
    total_bytes: int
    rel_cost: float = 0.0

    @property
    def fits(self) -> bool:
        return self.micro_bs > 0

    def to_dict(self) -> dict[str, Any]:
        s = self.setup
        return {"strategy": self.strategy, "fits": self.fits, "micro_bs": self.micro_bs, "accum": self.accum,
                "peak_bytes": self.peak_bytes, "total_bytes": self.total_bytes,
                "relative_step_cost": round(self.rel_cost, 2),
                "precision": s.precision, "grad_ckpt": s.grad_ckpt, "optimizer": s.optimizer, "lora": s.lora,
                "lora_r": s.lora_r if s.lora else None}


@dataclass
class BudgetFit:
    """What fits a budget: every strategy's largest micro-batch, the decision tree, the recommendation.

    `base` is the run's own setup and `asked` its (micro-batch, accumulation): what `changes` and
    `kept` compare each plan with."""

    budget: Budget
    global_bs: int | None
    world: int
    strategies: list[StrategyFit]  # the strategy table
    tree: list[StrategyFit]  # the decision tree from the run's own settings, in order
    recommended: StrategyFit | None
    base: Setup | None = None
    asked: tuple[int, int] | None = None

    def changes(self, row: StrategyFit) -> list[str]:
        """The flags that turn the run as asked into this plan (empty: the plan is the run as asked)."""
        return setting_changes(self.base, row.setup) + split_change(self.asked, row) if self.base else []

    def kept(self, row: StrategyFit) -> list[str]:
        """The run's own settings this plan keeps."""
        if self.base is None:
            return []
        mine, theirs = settings(self.base), settings(row.setup)
        kept = [v for k, v in mine.items() if theirs.get(k) == v]
        as_asked = row.fits and not split_change(self.asked, row)
        return kept + ([f"micro-bs {row.micro_bs} × accum {row.accum}"] if as_asked else [])

    def row_dict(self, row: StrategyFit) -> dict[str, Any]:
        """A row as JSON, with what it changes in the run and keeps of it (None where it does not fit)."""
        return {**row.to_dict(), "changes": self.changes(row) if row.fits else None,
                "keeps": self.kept(row) if row.fits else None}

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget.bytes, "budget": self.budget.label, "global_bs": self.global_bs,
                "devices": self.world, "asked": list(self.asked) if self.asked else None,
                "strategies": [self.row_dict(r) for r in self.strategies],
                "decision_tree": [self.row_dict(r) for r in self.tree],
                "recommended": self.row_dict(self.recommended) if self.recommended else None}


def settings(s: Setup) -> dict[str, str]:
    """A setup's memory settings as a user reads them: precision, optimizer, checkpointing, LoRA, base."""
    every = f" every {s.ckpt_every} blocks" if s.ckpt_every > 1 else ""
    out = {"precision": s.precision, "optimizer": s.optimizer,
           "grad_ckpt": f"grad ckpt{every}" if s.grad_ckpt else "no grad ckpt",
           "lora": f"LoRA r={s.lora_r}" if s.lora else "full fine-tuning"}
    if s.quantize:
        out["quantize"] = f"{s.quantize} base"
    return out


def setting_changes(base: Setup, s: Setup) -> list[str]:
    """The flags that change `base`'s memory settings into `s`'s (the batch split aside)."""
    out = []
    if s.precision != base.precision:
        out.append(f"--precision {s.precision}")
    if s.optimizer != base.optimizer:
        out.append(f"--optimizer {s.optimizer}")
    if s.grad_ckpt != base.grad_ckpt or (s.grad_ckpt and s.ckpt_every != base.ckpt_every):
        flag = "--grad-ckpt" if s.ckpt_every == 1 else f"--grad-ckpt-every {s.ckpt_every}"
        out.append(flag if s.grad_ckpt else "no --grad-ckpt")
    if s.lora != base.lora or (s.lora and s.lora_r != base.lora_r):
        out.append(f"--lora --lora-r {s.lora_r}" if s.lora else "no --lora")
    if s.quantize != base.quantize:
        out.append(f"--quantize {s.quantize}" if s.quantize else "no --quantize")
    return out


def split_change(asked: tuple[int, int] | None, row: StrategyFit) -> list[str]:
    """`--micro-bs M --accum A` when a fitting plan splits the batch otherwise than asked."""
    if not row.fits or asked == (row.micro_bs, row.accum):
        return []
    return [f"--micro-bs {row.micro_bs} --accum {row.accum}"]


# estimate-mem's answers with a budget, as exit codes (0 and 3 as before; 1 and 2 mean what they mean for
# every command, 130/143 interrupted)
FITS, NOTHING_FITS, FITS_WITH_CHANGE = 0, 3, 4
VERDICTS = {FITS: "fits as asked", FITS_WITH_CHANGE: "fits with the recommended change",
            NOTHING_FITS: "nothing fits"}


def verdict(fits_as_asked: bool | None, plan: BudgetFit | None) -> int:
    """The exit code of an estimate: FITS (also without a budget), FITS_WITH_CHANGE when the run as asked
    does not fit but the recommended plan does, NOTHING_FITS when not even that fits."""
    if fits_as_asked is not False:
        return FITS
    return FITS_WITH_CHANGE if plan is not None and plan.recommended is not None else NOTHING_FITS


MAX_AUTO_MICRO = 4096  # the largest micro-batch `--micro-bs auto` tries without a global batch


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending (in sqrt(n) steps: a global batch may be huge)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


class _Fitter:
    """Largest fitting micro-batch per setup, with every replay memoised."""

    def __init__(self, arch: ModelConfig, budget: Budget, global_bs: int | None, world: int, shard: str,
                 accum: int = 1, max_micro: int = MAX_AUTO_MICRO):
        self.arch, self.budget, self.global_bs, self.world, self.shard = arch, budget, global_bs, world, shard
        self.accum = accum  # without a global batch: the accumulation to keep
        self.max_micro = max(1, min(max_micro, MAX_AUTO_MICRO))  # without a global batch: the largest to try
        self.cache: dict[tuple[Setup, bool], Estimate] = {}

    def est(self, s: Setup, limited: bool = True) -> Estimate:
        key = (s, limited)
        if key not in self.cache:
            budget = self.budget if limited else None
            e = estimate(self.arch, s, budget, self.world, self.shard, fast=True)
            e.budget = self.budget
            self.cache[key] = e
        return self.cache[key]

    def candidates(self) -> list[tuple[int, int]]:
        """(micro-batch, accumulation) pairs that keep the global batch, smallest first."""
        if self.global_bs is None:
            return [(m, self.accum) for m in range(1, self.max_micro + 1)]
        per = self.global_bs // self.world
        return [(m, per // m) for m in divisors(per)]

    def fit(self, name: str, base: Setup) -> StrategyFit:
        cands = self.candidates()

        def ok(i: int) -> Estimate | None:
            m, acc = cands[i]
            e = self.est(replace(base, micro_bs=m, accum=min(acc, 2)))
            return e if e.fits else None

        lo, hi, best = 0, len(cands) - 1, None
        if self.global_bs is None:  # grow geometrically first: no need to replay 4096 sizes
            hi = 0
            while hi < len(cands) - 1 and ok(hi):
                lo, hi = hi, min(len(cands) - 1, 2 * hi + 1)
        while lo <= hi:
            mid = (lo + hi) // 2
            if ok(mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        if best is None:  # report the full peak at micro-batch 1, not the replay's stopping point
            e = self.est(replace(base, micro_bs=1, accum=min(cands[0][1], 2)), limited=False)
            return StrategyFit(name, e.setup, 0, 0, e.peak_bytes, e.total_bytes)
        m, acc = cands[best]
        e = self.est(replace(base, micro_bs=m, accum=min(acc, 2)))
        return StrategyFit(name, e.setup, m, acc, e.peak_bytes, e.total_bytes)


def step_cost(arch: ModelConfig, row: StrategyFit) -> float:
    """Rough time per token, for ranking strategies: the model's training FLOPs per token
    (`ModelConfig.flops_per_token`, every family; frozen LoRA weights need no weight gradient)
    plus a second forward of the checkpointed blocks, at tensor-core speed or half of it in fp32
    (TF32 off), plus a fixed cost per micro-step worth 512 tokens."""
    s, mc = row.setup, arch
    ckpt_frac = (len(range(0, arch.n_layer, s.ckpt_every)) / arch.n_layer) if s.grad_ckpt else 0.0
    keys = sum(min(s.seq_len, w) if (w := arch.layer_window(i)) else s.seq_len for i in range(arch.n_layer))
    block_forward = 2 * (mc.matmul_params() - mc.vocab_size * mc.n_embd) + 4 * mc.q_dim * keys
    flops = mc.flops_per_token(s.seq_len, 0.02 if s.lora else 1.0) + ckpt_frac * block_forward
    speed = 1.0 if s.policy.low_precision else 0.5
    tokens = max(1, row.micro_bs) * s.seq_len
    return flops / speed * (1 + 512 / tokens)


def fit_budget(arch: ModelConfig, base: Setup, budget: Budget, global_bs: int | None = None, world: int = 1,
               shard: str = "none", accum: int = 1, asked: tuple[int, int] | None = None,
               n_train: int | None = None) -> BudgetFit:
    """For each strategy the largest micro-batch that fits `budget` (runtime overhead included)
    with the accumulation that keeps `global_bs`; then the OOM decision tree, walked exactly:
    your settings (the largest micro-batch that fits) -> + gradient checkpointing -> + 8-bit
    AdamW -> + mixed precision -> + LoRA -> + QLoRA (nf4) -> + bf16 weights. The first step that fits is
    recommended. LoRA rows use the run's own rank (`base.lora_r`: --lora-r, whose default applies without
    --lora too); `asked` is the run's (micro-batch, accumulation), for saying what a plan changes;
    `n_train` (with --data) caps a micro-batch as `auto_batch_plan` does."""
    if global_bs is not None and global_bs % world:
        raise ConfigError(f"--global-bs {global_bs} is not divisible by {world} devices")
    f = _Fitter(arch, budget, global_bs, world, shard, accum, micro_cap(n_train, accum, world))
    mixed = "bf16-mixed" if budget.bf16 else "fp16-mixed"
    rank = base.lora_r
    plain = replace(base, grad_ckpt=False, lora=False, precision="fp32", quantize=None, double_quant=False,
                    optimizer="adamw" if base.optimizer == "adamw-8bit" else base.optimizer)
    lora = replace(base, lora=True, lora_targets=base.lora_targets or ("qkv", "proj"),
                   quantize=None, double_quant=False)
    strategies = [
        ("fp32", plain),
        (mixed, replace(plain, precision=mixed)),
        (f"{mixed} + grad ckpt", replace(plain, precision=mixed, grad_ckpt=True, ckpt_every=1)),
        (f"{mixed} + grad ckpt + 8-bit AdamW", replace(plain, precision=mixed, grad_ckpt=True, ckpt_every=1,
                                                        optimizer="adamw-8bit")),
        (f"{mixed} + grad ckpt + 8-bit AdamW + LoRA r={rank}",
         replace(lora, precision=mixed, grad_ckpt=True, ckpt_every=1, optimizer="adamw-8bit")),
        (f"{mixed} + grad ckpt + 8-bit AdamW + QLoRA (nf4) r={rank}",
         replace(lora, precision=mixed, grad_ckpt=True, ckpt_every=1, optimizer="adamw-8bit",
                 quantize="nf4")),
    ]
    if budget.bf16:  # past mixed precision: bf16 weights (the only way a 7B model trains on 24 GB)
        strategies.append((f"bf16-true + grad ckpt + LoRA r={rank}",
                           replace(lora, precision="bf16-true", grad_ckpt=True, ckpt_every=1)))
    rows = [f.fit(name, s) for name, s in strategies]
    steps, cur = [("your settings", base)], base
    if not cur.grad_ckpt:
        cur = replace(cur, grad_ckpt=True, ckpt_every=1)
        steps.append(("+ gradient checkpointing", cur))
    if cur.optimizer == "adamw":
        cur = replace(cur, optimizer="adamw-8bit")
        steps.append(("+ 8-bit AdamW", cur))
    if not cur.policy.low_precision:
        cur = replace(cur, precision=mixed)
        steps.append((f"+ mixed precision ({mixed})", cur))
    if not cur.lora:
        cur = replace(cur, lora=True, lora_targets=base.lora_targets or ("qkv", "proj"))
        steps.append((f"+ LoRA r={rank}", cur))
    if not cur.quantize:
        cur = replace(cur, quantize="nf4")
        steps.append(("+ QLoRA (nf4)", cur))
    if budget.bf16 and cur.policy.param_dtype != "bfloat16":
        steps.append(("+ bf16 weights (bf16-true)", replace(cur, precision="bf16-true")))
    tree: list[StrategyFit] = []
    for name, s in steps:
        tree.append(f.fit(name, s))
        if tree[-1].fits:
            break
    fitting = [r for r in rows if r.fits] or [r for r in tree if r.fits]
    ref = min((step_cost(arch, r) for r in fitting), default=1.0)  # the cheapest strategy that fits is 1.00x
    for r in rows + tree:
        r.rel_cost = step_cost(arch, r) / ref
    return BudgetFit(budget, global_bs, world, rows, tree, tree[-1] if tree[-1].fits else None, base, asked)


# --- for a run (runs.py) and estimate-mem -----------------------------------------------------------
METHODS = ("sft", "dpo")


def check_method(method: str) -> None:
    """One line for an --method the planner does not know."""
    if method not in METHODS:
        raise ConfigError(f"--method {method}: choose {' or '.join(METHODS)}")


def with_method(s: Setup, cfg: RunConfig, method: str = "sft") -> Setup:
    """`s` as the step of `method`: SFT's, or `microft dpo`'s with the run's --loss and --precompute-ref
    (micro-batches of pairs, the reference forward or none; memory/preference.py)."""
    check_method(method)
    if method == "sft":
        return s
    return replace(s, method=method, pref_loss=cfg.loss, precompute_ref=cfg.precompute_ref)


def _base(cfg: RunConfig, arch: ModelConfig, precision: str | None, budget: Budget | None = None,
          method: str = "sft") -> Setup:
    s = setup_for(cfg, arch, 1, precision=precision or resolve_precision(cfg.precision, budget))
    return with_method(s, cfg, method)


def _budget(budget_bytes: int) -> Budget:
    return Budget(budget_bytes, f"{budget_bytes / GiB:.1f} GiB")


class NothingFits(ConfigError):
    """`--micro-bs auto` found no micro-batch that fits (estimate-mem answers it as "does not fit")."""


def micro_cap(n_train: int | None, accum: int, world: int) -> int:
    """The largest micro-batch worth planning without a global batch: a device's share of one optimizer
    step over the `n_train` training samples (any size up to MAX_AUTO_MICRO when unknown)."""
    return MAX_AUTO_MICRO if n_train is None else n_train // (accum * world)


def auto_batch_plan(cfg: RunConfig, arch: ModelConfig, budget: Budget, world_size: int = 1,
                    n_train: int | None = None, method: str = "sft") -> BatchPlan:
    """`--micro-bs auto`, for finetune, pretrain, dpo (`method` "dpo": micro-batches of pairs) and
    estimate-mem alike: the largest micro-batch
    (dividing the per-device global batch when one is given; else at most a device's share of the
    `n_train` training samples, so one optimizer step's batch never outgrows the data) whose estimated
    peak plus runtime overhead fits `budget`, with the accumulation that keeps --global-bs (else --accum).

    Raises NothingFits (a ConfigError), with what would fit instead, when not even micro-batch 1 fits."""
    world, shard = scale_out(cfg)
    base = _base(cfg, arch, None, budget, method)
    accum = cfg.accum or 1
    cap = micro_cap(n_train, accum, world_size)
    row = _Fitter(arch, budget, cfg.global_bs, world, shard, accum, cap).fit("your settings", base)
    if not row.fits:
        raise NothingFits(f"micro-batch 1 does not fit in {budget.label} (estimated "
                          f"{row.total_bytes / GiB:.2f} GiB with runtime overhead); "
                          f"{_advice(cfg, arch, budget, method)}")
    return resolve_batch_plan(row.micro_bs, None if cfg.global_bs else cfg.accum, cfg.global_bs, world_size)


def plan_advice(cfg: RunConfig, model_cfg: ModelConfig, budget_bytes: int, method: str = "sft") -> str:
    """One line for an out-of-memory message: what the decision tree recommends on this budget."""
    return _advice(cfg, with_dropout(model_cfg, cfg.dropout), _budget(budget_bytes), method)


def _advice(cfg: RunConfig, arch: ModelConfig, budget: Budget, method: str = "sft") -> str:
    base = _base(cfg, arch, None, budget, method)
    world, shard = scale_out(cfg)
    p = fit_budget(arch, base, budget, cfg.global_bs, world, shard, cfg.accum or 1)
    r = p.recommended
    if r is None:
        return f"nothing fits {budget.label}, not even LoRA with bf16 weights at micro-batch 1"
    flags = [f"--micro-bs {r.micro_bs}", f"--accum {r.accum}", *setting_changes(base, r.setup)]
    return (f"estimate-mem recommends {r.strategy}: {' '.join(flags)} "
            f"(estimated {r.total_bytes / GiB:.2f} GiB of {budget.label})")


def estimate_for_run(cfg: RunConfig, model_cfg: ModelConfig, plan: BatchPlan, precision: str | None = None,
                     engine: str = "analytical", method: str = "sft") -> dict[str, Any]:
    """The estimate for a run about to start, as a dict (`Estimate.to_dict()` plus `summary`).

    `precision`: the trainer's resolved precision (else `cfg.precision`, auto -> bf16-mixed).
    `engine`: "analytical" (instant) or "trace" (the measured peak on CPU, a few seconds); `method`: "dpo"
    for `microft dpo`'s step."""
    arch = with_dropout(model_cfg, cfg.dropout)
    s = replace(_base(cfg, arch, precision, method=method), micro_bs=plan.micro_bs, accum=min(plan.accum, 2))
    fn = trace if engine == "trace" else estimate
    e = fn(arch, s, world=plan.world_size, shard=scale_out(cfg)[1] if plan.world_size > 1 else "none")
    return {**e.to_dict(), "summary": e.summary()}
