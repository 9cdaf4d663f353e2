"""The training loop and its parts; imports nothing from the estimator (memory/).

step.py         one micro-step, clipping, the optimizer step, the precision policy (shared with
                memory/trace.py)
loop.py         train(): set-up and restore, the steps, evaluation, checkpoints, the summary
optim.py        the optimizer a run builds (its entry in microft.optimizers) and learning-rate schedules
master_adamw.py bf16-true's AdamW, exact fp32 master weights in 16 more bits per weight
optim8bit.py    AdamW with 8-bit blockwise-quantized moments
checkpoint.py   training checkpoints: train_state.pt, RNG, finding and pruning step directories
distributed.py  torchrun: process groups, DDP/FSDP wrapping, full-state gathering, --devices
"""
