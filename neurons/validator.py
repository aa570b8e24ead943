"""Quasar SN24 validator: `python neurons/validator.py --netuid 24 --wallet.name NAME --wallet.hotkey HOTKEY ...`

Each round: read the miners' commitments, download and check their checkpoints, score them on
KL fidelity to the teacher and on long-context tasks (seeded by the round's block hash), compare
them pairwise, fold the result into a moving average and set weights. `--help` lists every
setting; with no flags it runs on the embedded default under ~/.quasar-sn24.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from neurons.cli import run_neuron


def main(argv: list[str] | None = None) -> int:
    from neurons.config import ValidatorConfig

    def make(cfg: ValidatorConfig):
        # imported after parsing: `--help` and bad flags need no model code
        from neurons.validator_loop import Validator

        return Validator(cfg)

    return run_neuron("validator", ValidatorConfig, make, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
