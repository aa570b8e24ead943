"""Sequence-mixing ops for the Quasar student: Quasar attention (EFLA) and gated linear attention.

`kernels.reference` holds the naive recurrent definitions; `kernels.efla` and `kernels.gla` the
chunked PyTorch versions. This package imports nothing else of the project's.
"""

from kernels.ops import BACKENDS, gla_attention, quasar_attention
from kernels.reference import efla_step_size

__all__ = ["BACKENDS", "efla_step_size", "gla_attention", "quasar_attention"]
