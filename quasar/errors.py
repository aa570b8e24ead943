"""Errors the model package raises about checkpoints (shared by quasar.checkpoint and
QuasarForCausalLM.from_pretrained, which cannot import each other)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the expected Quasar model; the message says why."""
