"""The model core: one transformer for every family, its config, loss, HF checkpoints and loading.

Import the submodules (`microft.models.config` has no torch import; the others do).
"""
