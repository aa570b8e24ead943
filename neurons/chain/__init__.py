"""Chain adapters: the `Chain` interface (`base`) and the embedded dev chain (`embedded`)."""

from neurons.chain.base import (
    MAX_COMMITMENT_BYTES,
    U16_MAX,
    Chain,
    ChainError,
    ChainLimits,
    ChainUnavailable,
    CommitmentRecord,
    CommitmentTooLarge,
    InvalidWeights,
    Metagraph,
    Neuron,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
    WeightsRecord,
    weights_to_u16,
)
from neurons.chain.embedded import EmbeddedChain

__all__ = [
    "MAX_COMMITMENT_BYTES",
    "U16_MAX",
    "Chain",
    "ChainError",
    "ChainLimits",
    "ChainUnavailable",
    "CommitmentRecord",
    "CommitmentTooLarge",
    "EmbeddedChain",
    "InvalidWeights",
    "Metagraph",
    "Neuron",
    "NoValidatorPermit",
    "NotRegistered",
    "RateLimited",
    "WeightsRecord",
    "weights_to_u16",
]
