"""Copies earn nothing, in a 12-miner field judged by the real validator (worker processes, the
round's own prompts), while a genuinely better fine-tune of the same checkpoint takes the lead.

The field: an original distilled student; three copies that evade a hash check and a public
uniform-token fingerprint (the input rows of tokens real text never uses re-drawn; 1e-2 relative
noise on every tensor; a 5-step fine-tune at a learning rate too small to improve it); seven independent students
(other seeds and lengths of training) that the original beats or not; and a
20-step fine-tune of the original at the normal learning rate, committed last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from neurons.commitment import Commitment
from neurons.store import LocalStore, content_hash
from tests.neurons.test_validator_attacks import chain_for, make_root, make_validator

NETUID = 24
STEPS = 30  # the original trains longest: the copies' attack is to beat whom it beats


def train(
    root: Path,
    out: Path,
    *,
    steps: int,
    seed: int,
    init_from: Path | None = None,
    lr: float = 3e-3,
    name: str | None = None,
) -> Path:
    """Train (or resume the run in `out` up to `steps`) and return a publishable copy of the final
    checkpoint, named `name` (default: the run's name)."""
    from distill.cli import load_tokenizer, run_train
    from distill.config import TrainConfig

    kit = root / "devkit"
    vocab = len(load_tokenizer(str(kit / "tokenizer")))
    student = (
        {"init_from": str(init_from)} if init_from else {"preset": "tiny", "overrides": {"vocab_size": vocab}}
    )
    cfg = TrainConfig.model_validate(
        {
            "out_dir": str(out), "steps": steps, "schedule_steps": max(steps, 100), "k": 32,
            "teacher": {"kind": "hf", "model": str(kit / "teacher"), "device": "cpu"},
            "student": student,
            "data": {
                "sources": [str(kit / "text")], "tokenizer": str(kit / "tokenizer"), "sample_len": 64,
                "seq_len": 128, "batch_size": 4, "eval_samples": 8,
            },
            "optim": {"lr": lr, "warmup_steps": 0 if init_from else 5},
            "seed": seed, "device": "cpu", "save_every": steps, "eval_every": steps, "log_every": 100,
            "progress": False,
        }
    )  # fmt: skip
    result = run_train(cfg)
    publishable = out.parent / f"{name or out.name}-final"
    shutil.rmtree(publishable, ignore_errors=True)
    publishable.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(result.final_checkpoint / name, publishable / name)
    return publishable


def edit(source: Path, dest: Path, change) -> Path:
    shutil.copytree(source, dest)
    state = load_file(str(dest / "model.safetensors"))
    change(state)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def unused_token_ids(root: Path) -> list[int]:
    from distill.cli import load_tokenizer

    tokenizer = load_tokenizer(str(root / "devkit" / "tokenizer"))
    used = set()
    for line in (root / "devkit" / "text" / "corpus.jsonl").read_text().splitlines():
        used.update(tokenizer(json.loads(line)["text"])["input_ids"])
    return sorted(set(range(len(tokenizer))) - used)


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    root = make_root(tmp_path_factory, "copies")
    work = root / "work"
    original = train(root, work / "original", steps=STEPS, seed=0)
    unused = unused_token_ids(root)
    gen = torch.Generator().manual_seed(7)

    def redraw_unused(state):
        rows = state["model.embed_tokens.weight"]
        if unused:
            rows[unused] = torch.randn(len(unused), rows.shape[1], generator=gen) * rows.std()

    def noise(state):
        for name, value in state.items():
            if value.is_floating_point() and value.numel() > 1:
                state[name] = value + 1e-2 * value.std() * torch.randn(value.shape, generator=gen)

    field = [("original", original)]  # in commitment order
    for seed, steps in ((1, 25), (2, 10), (3, 20)):
        field.append((f"seed{seed}", train(root, work / f"seed{seed}", steps=steps, seed=seed)))
    field.append(("unused-rows", edit(original, work / "unused-rows", redraw_unused)))
    field.append(("noise", edit(original, work / "noise", noise)))
    field.append(("finetune-5", train(root, work / "ft5", steps=5, seed=11, init_from=original, lr=3e-6)))
    for seed, steps in ((4, 15), (5, 5), (6, 25), (7, 12)):
        field.append((f"seed{seed}", train(root, work / f"seed{seed}", steps=steps, seed=seed)))
    # the original's own run, 20 steps further: real improvement, early in training
    field.append(("finetune-20", train(root, work / "original", steps=STEPS + 20, seed=0, name="ft20")))
    assert len(field) == 12
    store = LocalStore(root / "store")
    for name, path in field:
        hotkey = f"{name}/default"
        revision = store.stage(path, name)
        data = Commitment.for_checkpoint("local", name, revision, content_hash(path), hotkey).encode()
        with chain_for(root, hotkey) as chain:
            chain.advance(1)
            chain.commit(data)
        store.publish(name, revision)
    validator = make_validator(root, kl={"prompts": 24, "prompt_tokens": 48, "score_from": 4})
    try:
        validator.start_round()
        validator.run_round()
        return validator.state.last, unused
    finally:
        validator.close()


def test_evading_copies_earn_at_most_one_percent_of_the_original(field) -> None:
    last, unused = field
    results = last.results
    assert all(r.status in ("ok", "copy") for r in results.values()), {
        h: (r.status, r.code, r.reason) for h, r in results.items()
    }
    weights = last.round_weights
    original = weights["original/default"]
    assert original > 0
    for copy in ("unused-rows", "noise", "finetune-5"):
        r = results[f"{copy}/default"]
        assert (r.status, r.copy_of) == ("copy", "original/default"), (copy, r.reason)
        assert weights.get(f"{copy}/default", 0.0) <= 0.01 * original
    # re-drawn rows that real text never reads leave the real-text fingerprint unchanged
    assert "copy-detection probe" in results["unused-rows/default"].reason or not unused
    assert "outputs on this round's prompts" in results["noise/default"].reason


def test_a_genuinely_better_finetune_takes_the_lead_and_independent_students_are_not_copies(field) -> None:
    last, _ = field
    results = last.results
    better, original = results["finetune-20/default"], results["original/default"]
    assert better.status == "ok", better.reason
    assert better.mean_kl < (1 - 0.03) * original.mean_kl
    assert max(last.round_weights, key=last.round_weights.get) == "finetune-20/default"
    for name in ("seed1", "seed2", "seed3", "seed4", "seed5", "seed6", "seed7"):
        assert results[f"{name}/default"].status == "ok", (name, results[f"{name}/default"].reason)
    assert np.isclose(sum(last.round_weights.values()), 1.0)
