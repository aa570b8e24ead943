"""Model-process factories for the isolation tests (`--factory tests.validator_tasks.fake_models:make`).

The behaviour is picked by the model directory's name, so one run can mix them:
`*hang*` never answers, `*crash*` kills its own process on the first sample, `*loadfail*` fails to
load, `*slow*` answers after 0.5 s; any other directory is loaded for real."""

from __future__ import annotations

import os
import time
from pathlib import Path

from validator_tasks.models import ModelLoadError, Prediction


class _Fake:
    def __init__(self, mode: str):
        self.mode = mode

    def predict(self, sample, deadline=None) -> Prediction:
        if self.mode == "hang":
            while True:  # ignores its deadline, like a model stuck inside one forward call
                time.sleep(0.05)
        if self.mode == "crash":
            os._exit(3)
        time.sleep(0.5)
        return Prediction(text="nothing useful")


def make(args):
    name = Path(args.model).name
    for mode in ("hang", "crash", "slow"):
        if mode in name:
            return _Fake(mode), {"kind": f"fake-{mode}", "parameters": {"total": 1, "active": 1}}
    if "loadfail" in name:
        raise ModelLoadError(f"{args.model}: deliberately unloadable")
    from validator_tasks.worker import _default_factory

    return _default_factory(args)
