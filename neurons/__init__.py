"""The subnet node: miner and validator entry points, configuration, chain adapters (Bittensor and
the embedded dev chain), the commitment protocol, the checkpoint store, verification, weights, state."""
