"""Quasar SN24 miner: `python neurons/miner.py --netuid 24 --wallet.name NAME --wallet.hotkey HOTKEY ...`

Distils a teacher into a Quasar student round after round, evaluates each checkpoint, and publishes
and commits the ones that improve. `--help` lists every setting; with no flags it runs on the
embedded default (dev chain, local store, tiny local teacher) under ~/.quasar-sn24.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from neurons.cli import run_neuron


def main(argv: list[str] | None = None) -> int:
    from neurons.config import MinerConfig

    def make(cfg: MinerConfig):
        # imported after parsing: `--help` and bad flags need no model code
        from neurons.miner_loop import Miner

        return Miner(cfg)

    return run_neuron("miner", MinerConfig, make, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
