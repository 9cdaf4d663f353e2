"""The training loop and its parts; imports nothing from the estimator (memory/).

step.py         one micro-step, clipping, the optimizer step, the precision policy (shared with
                memory/trace.py)
loop.py         train(): set-up and restore, the steps, evaluation, checkpoints, the summary
optim.py        optimizers and learning-rate schedules
checkpoint.py   training checkpoints: train_state.pt, RNG, finding and pruning step directories
distributed.py  torchrun: process groups, DDP/FSDP wrapping, full-state gathering, --devices
"""
