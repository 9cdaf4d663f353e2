"""Peak training memory: the estimator and the batch planner. Imports torch only in trace.py.

sim.py       the byte-level replay engine (tensors, allocator rounding, peaks by component)
replay.py    microft's training step replayed from shapes (Setup, Replay over a ModelConfig)
trace.py     microft's real step (train/step.py) run on fake tensors, bytes counted as they live
estimate.py  the public estimate: `estimate` (analytical), `trace`, budgets, runtime overhead
plan.py      the planner: largest micro-batch per strategy, the OOM decision tree, the run's hooks

Import the functions from their modules (`from microft.memory.estimate import estimate`): the
package re-exports nothing, so `microft.memory.trace` always names the module.
"""
