"""Chain adapters: the `Chain` interface (`base`), the embedded dev chain (`embedded`) and the real
network through the Bittensor SDK (`bittensor_chain`, imported on first use of `BittensorChain`:
the SDK takes about half a second to import, which `import neurons.chain` should not pay)."""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from neurons.chain.bittensor_chain import BittensorChain

__all__ = [
    "MAX_COMMITMENT_BYTES",
    "U16_MAX",
    "BittensorChain",
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


def __getattr__(name: str) -> Any:
    if name == "BittensorChain":
        from neurons.chain.bittensor_chain import BittensorChain

        globals()[name] = BittensorChain
        return BittensorChain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
