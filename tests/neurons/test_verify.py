"""Validator pre-checks: each failure code on a real tiny checkpoint (a forward's cost bounded, not
only its parameters), and copy detection by content hash and by activation fingerprint
(noise-injected copies), earliest commitment owning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from neurons.commitment import Commitment
from neurons.store import content_hash
from neurons.verify import Competition, Submission, cosine, find_copies, fingerprint, verify_checkpoint
from quasar import QuasarConfig, QuasarForCausalLM
from quasar.checkpoint import save_checkpoint
from quasar.cost import forward_cost

REV = "0" * 40
COMPETITION = Competition(
    fixed_fields={"vocab_size": 512},
    max_parameters=1_000_000,  # tiny: 0.2M
    reference_cost=forward_cost(QuasarConfig.from_preset("tiny", vocab_size=512)),
    max_cost_ratio=4.0,
)
PROBE = torch.Generator().manual_seed(3)
PROBE_WINDOWS = torch.randint(0, 512, (2, 16), generator=PROBE).tolist()
PROBE_IDS = sorted(torch.randperm(512, generator=PROBE)[:64].tolist())


def _save(path, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = QuasarForCausalLM(QuasarConfig.from_preset("tiny", **{"vocab_size": 512, **overrides}))
    save_checkpoint(model, path)
    return path


def _commit(path, hotkey: str) -> Commitment:
    return Commitment.for_checkpoint("local", "m", REV, content_hash(path), hotkey)


def test_a_good_checkpoint_passes_and_loads(tmp_path) -> None:
    path = _save(tmp_path / "good")
    verdict = verify_checkpoint(path, _commit(path, "5A"), "5A", COMPETITION)
    assert verdict.ok and verdict.model is not None and verdict.content_hash == content_hash(path)
    assert 0 < verdict.parameters <= COMPETITION.max_parameters


def test_each_failure_has_its_code_and_reason(tmp_path) -> None:
    good = _save(tmp_path / "good")
    cases = []
    wrong_vocab = _save(tmp_path / "vocab", vocab_size=1024)
    cases.append(
        (
            wrong_vocab,
            _commit(wrong_vocab, "5A"),
            "CONFIG",
            "vocab_size is 1024, the competition requires 512",
        )
    )
    big = _save(tmp_path / "big", hidden_size=256, intermediate_size=1024)
    cases.append((big, _commit(big, "5A"), "BUDGET", "over the budget"))
    cases.append((good, _commit(good, "5Mallory"), "BINDING", "not committed by this hotkey"))
    nan = tmp_path / "nan"
    _save(nan)
    state = load_file(str(nan / "model.safetensors"))
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    cases.append((nan, _commit(nan, "5A"), "WEIGHTS", "NaN or infinite"))
    shaped = tmp_path / "shaped"
    _save(shaped)
    state = load_file(str(shaped / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, str(shaped / "model.safetensors"), metadata={"format": "pt"})
    cases.append((shaped, _commit(shaped, "5A"), "WEIGHTS", "has shape"))
    custom = tmp_path / "custom"
    _save(custom)
    cfg = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))
    cases.append((custom, _commit(good, "5A"), "CONFIG", "auto_map"))
    pickled = tmp_path / "pickled"
    _save(pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    cases.append((pickled, _commit(good, "5A"), "WEIGHTS", "needs config.json and"))
    for path, commitment, code, reason in cases:
        verdict = verify_checkpoint(path, commitment, "5A", COMPETITION)
        assert verdict.code == code and reason in verdict.reason, (path.name, verdict)
    unloaded = verify_checkpoint(good, _commit(good, "5A"), "5A", COMPETITION, load=False)
    assert unloaded.ok and unloaded.model is None  # the validator loads in its bounded worker


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"num_loops": 500_000}, "flops per token"),  # adds 499,998 scalars: far inside the budget
        ({"num_loops": 2000}, "num_loops 2000"),
        ({"memory_slots": 200_000, "memory_dim": 1, "memory_segment_size": 1}, "activation bytes per token"),
        ({"memory_slots": 600_000, "memory_dim": 1, "memory_segment_size": 1}, "memory_slots 600000"),
        ({"num_heads": 1, "head_dim": 2048, "output_gate_rank": 4}, "state bytes"),
    ],
)
def test_a_forward_that_costs_too_much_per_token_is_over_budget(overrides, words) -> None:
    from neurons.verify import cost_problem

    config = QuasarConfig.from_preset("tiny", vocab_size=512, **overrides)
    with torch.device("meta"):
        parameters = QuasarForCausalLM(config).parameter_counts()["total"]
    problem = cost_problem(config, COMPETITION)
    assert words in problem and "costs more than 4x the competition architecture's" in problem, problem
    if "num_loops" in overrides or "memory_dim" in overrides:
        assert parameters <= COMPETITION.max_parameters  # the parameter budget alone lets them through
    # the competition's own architecture, and 2 extra loops of it, are fine
    assert cost_problem(QuasarConfig.from_preset("tiny", vocab_size=512), COMPETITION) == ""
    assert cost_problem(QuasarConfig.from_preset("tiny", vocab_size=512, num_loops=4), COMPETITION) == ""


def test_copies_by_hash_and_by_fingerprint_earliest_owns(tmp_path) -> None:
    original = _save(tmp_path / "orig", seed=0)
    other = _save(tmp_path / "other", seed=1)
    noisy = tmp_path / "noisy"
    _save(noisy, seed=0)
    state = load_file(str(noisy / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    state = {k: v + 1e-5 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(state, str(noisy / "model.safetensors"), metadata={"format": "pt"})
    assert content_hash(noisy) != content_hash(original)

    def submission(path, hotkey, block):
        verdict = verify_checkpoint(path, _commit(path, hotkey), hotkey, COMPETITION)
        assert verdict.ok
        return Submission(
            hotkey, block, verdict.content_hash, fingerprint(verdict.model, PROBE_WINDOWS, PROBE_IDS)
        )

    subs = [
        submission(noisy, "5Noisy", 30),
        submission(original, "5Orig", 10),
        submission(other, "5Other", 20),
        submission(original, "5Exact", 40),
    ]
    fp = {s.hotkey: s.fingerprint for s in subs}
    assert cosine(fp["5Orig"], fp["5Noisy"]) >= 0.99999 > cosine(fp["5Orig"], fp["5Other"])
    assert find_copies(subs) == {"5Noisy": "5Orig", "5Exact": "5Orig"}
    # were the copy committed first, it would own the weights
    swapped = [
        Submission(s.hotkey, 5 if s.hotkey == "5Noisy" else s.block, s.content_hash, s.fingerprint)
        for s in subs
    ]
    assert find_copies(swapped) == {"5Orig": "5Noisy", "5Exact": "5Noisy"}
    # the fingerprint is deterministic
    model = verify_checkpoint(original, _commit(original, "5Orig"), "5Orig", COMPETITION).model
    assert (fingerprint(model, PROBE_WINDOWS, PROBE_IDS) == fp["5Orig"]).all()


def test_find_copies_same_block_is_decided_the_same_everywhere() -> None:
    a, b = Submission("5B", 7, "h"), Submission("5A", 7, "h")
    assert find_copies([a, b]) == find_copies([b, a]) == {"5B": "5A"}
    with pytest.raises(TypeError):
        Submission("5A", 7)  # content hash is required
