"""Validator pre-checks on a downloaded submission, before any scoring time is spent on it.

`verify_checkpoint` runs the checks in order of cost and stops at the first failure, returning a
`Verdict` with a code and a reason a miner can act on:

- CONFIG: config.json missing, unparsable, not Quasar, custom code, or a fixed field of the
  competition (e.g. the teacher's vocabulary size) differs.
- BUDGET: more parameters than the competition allows (counted on the meta device, nothing allocated),
  or a forward that costs more per token than `max_cost_ratio` times the competition architecture's
  (flops, recurrent state, activation memory: `quasar.cost`). Parameters alone bound nothing a
  miner cannot multiply for free: `num_loops`, one wide head, a memory of a million 1-wide slots.
- BINDING: the commitment's binding is not sha256(content hash || hotkey): not this hotkey's upload.
- WEIGHTS: no safetensors, wrong tensor names or shapes, NaN or infinite values (our strict loader).

Copies are found across submissions by `find_copies`: identical content, or a near-identical
fingerprint (centred logits on a probe of real text that only the validator knows,
`validator_tasks.kl_eval.probe_logits`). The earliest commitment owns the weights; later ones are
copies. Copies that evade both (re-drawn unused rows, noise, a short fine-tune) are caught on the
round's own prompts by the validator's payout rule (`neurons.scoring.resemblance_copies`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from neurons.commitment import Commitment
from neurons.store import StoreError, content_hash
from quasar.cost import ForwardCost

Code = Literal["OK", "CONFIG", "BUDGET", "BINDING", "WEIGHTS", "COPY"]
FINGERPRINT_COSINE = 0.99999  # SN97's threshold: independent training never gets this close


@dataclass(frozen=True)
class Competition:
    """What a submission must be: fields that must equal given values, and a parameter budget."""

    fixed_fields: dict[str, Any] = field(default_factory=dict)
    max_parameters: int = 3_500_000_000
    max_download_bytes: int = 16 * 2**30
    reference_cost: ForwardCost | None = None  # the competition architecture's forward cost
    max_cost_ratio: float = 4.0  # a submission's forward may cost this many times the reference's


@dataclass
class Verdict:
    code: Code
    reason: str = ""
    content_hash: str | None = None
    parameters: int | None = None
    model: Any = None  # the loaded model when code == "OK"

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def cost_problem(config, competition: Competition) -> str:
    """Why `config`'s forward costs too much per token for `competition` ("" when it does not)."""
    if competition.reference_cost is None:
        return ""
    from quasar.cost import forward_cost

    ratios = forward_cost(config).ratios(competition.reference_cost)
    over = {axis: r for axis, r in ratios.items() if r > competition.max_cost_ratio}
    if not over:
        return ""
    detail = ", ".join(f"{axis.replace('_', ' ')} {r:,.1f}x" for axis, r in over.items())
    return (
        f"a forward costs more than {competition.max_cost_ratio:g}x the competition architecture's "
        f"({detail}; num_loops {config.num_loops}, memory_slots {config.memory_slots} x memory_dim "
        f"{config.memory_dim} per {config.memory_segment_size}-token segment, {config.num_heads} heads of "
        f"{config.head_dim}): lower them"
    )


def verify_checkpoint(
    path: str | Path,
    commitment: Commitment,
    hotkey: str,
    competition: Competition,
    *,
    device: str = "cpu",
    load: bool = True,
) -> Verdict:
    """The checks above in order; with `load=False` the weights are hashed but not loaded (the
    validator loads them in a bounded worker process instead)."""
    from quasar import QuasarForCausalLM
    from quasar.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config

    path = Path(path)
    try:
        config = read_checkpoint_config(path)
    except CheckpointError as e:
        return Verdict("CONFIG", str(e))
    wrong = [
        f"{name} is {getattr(config, name, None)!r}, the competition requires {value!r}"
        for name, value in competition.fixed_fields.items()
        if getattr(config, name, None) != value
    ]
    if wrong:
        return Verdict("CONFIG", "; ".join(wrong))
    with torch.device("meta"):
        parameters = QuasarForCausalLM(config).parameter_counts()["total"]
    if parameters > competition.max_parameters:
        return Verdict(
            "BUDGET",
            f"{parameters / 1e6:,.1f}M parameters, over the budget of {competition.max_parameters / 1e6:,.1f}M",
            parameters=parameters,
        )
    problem = cost_problem(config, competition)
    if problem:
        return Verdict("BUDGET", problem, parameters=parameters)
    try:
        digest = content_hash(path)
    except StoreError as e:
        return Verdict("WEIGHTS", str(e), parameters=parameters)
    if not commitment.binds(digest, hotkey):
        return Verdict(
            "BINDING",
            "the commitment's binding does not match sha256(content hash || hotkey): "
            "these weights were not committed by this hotkey",
            content_hash=digest,
            parameters=parameters,
        )
    if not load:
        return Verdict("OK", content_hash=digest, parameters=parameters)
    try:
        model = load_checkpoint(path, config, device=device, check_finite=True)
    except CheckpointError as e:
        return Verdict("WEIGHTS", str(e), content_hash=digest, parameters=parameters)
    return Verdict("OK", content_hash=digest, parameters=parameters, model=model)


def fingerprint(model, probe: list[list[int]], ids: list[int]) -> np.ndarray:
    """The model's centred logits on `probe` (token windows of real text) at the vocabulary `ids`."""
    from validator_tasks.kl_eval import probe_logits

    return probe_logits(model, probe, ids)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0 or a.shape != b.shape:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


@dataclass(frozen=True)
class Submission:
    hotkey: str
    block: int  # the block of its commitment
    content_hash: str
    fingerprint: np.ndarray | None = None


def earliest_owner(
    candidate: Submission, others: Sequence[Submission], threshold: float = FINGERPRINT_COSINE
) -> Submission | None:
    """The earliest submission of another hotkey, committed before `candidate`, that holds the same
    content or a near-identical fingerprint; None when `candidate` is original. Equal blocks fall
    to the lexicographically smaller hotkey, so every validator decides the same way."""
    key = (candidate.block, candidate.hotkey)
    for earlier in sorted(others, key=lambda s: (s.block, s.hotkey)):
        if earlier.hotkey == candidate.hotkey or (earlier.block, earlier.hotkey) >= key:
            continue
        same = earlier.content_hash == candidate.content_hash
        near = (
            candidate.fingerprint is not None
            and earlier.fingerprint is not None
            and cosine(candidate.fingerprint, earlier.fingerprint) >= threshold
        )
        if same or near:
            return earlier
    return None


def find_copies(submissions: Sequence[Submission], threshold: float = FINGERPRINT_COSINE) -> dict[str, str]:
    """{copier hotkey: owner hotkey} among `submissions`, comparing with originals only."""
    copies: dict[str, str] = {}
    for s in sorted(submissions, key=lambda s: (s.block, s.hotkey)):
        originals = [o for o in submissions if o.hotkey not in copies]
        owner = earliest_owner(s, originals, threshold)
        if owner is not None:
            copies[s.hotkey] = owner.hotkey
    return copies
