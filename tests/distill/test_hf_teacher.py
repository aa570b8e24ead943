"""HFTeacher: exact top-k and tail against a direct full log_softmax, independent of chunking and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.teachers import HFTeacher, TeacherConfig, TeacherError, build_teacher
from distill.types import MISSING_ID, Teacher

VOCAB = 1000


def small_qwen3(seed: int = 0, logit_scale: float = 1.0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # a peaked distribution: the top-k holds almost all the mass
        model.lm_head.weight.mul_(logit_scale)
    return model


def reference(model, seq: list[int], k: int):
    """Row t from the full float64 log_softmax of the logits at t - 1; tail = logsumexp of the rest."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    lp = torch.log_softmax(logits, -1)[:-1]  # position t - 1 predicts token t
    val, idx = torch.topk(lp, k, -1)
    rest = lp.scatter(-1, idx, -torch.inf)
    return idx.numpy(), val.numpy(), torch.logsumexp(rest, -1).numpy(), lp.numpy()


def sequences(lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = np.random.default_rng(seed)
    return [gen.integers(0, VOCAB, n).tolist() for n in lengths]


def assert_rows_match(got, want_ids, want_lp, full_lp, lp_atol=1e-5):
    """Logprobs equal slot by slot; ids equal except swaps between (near-)tied candidates."""
    np.testing.assert_allclose(got.logprobs[1:], want_lp, atol=lp_atol, rtol=0)
    for t, j in zip(*np.nonzero(got.token_ids[1:] != want_ids)):
        assert abs(full_lp[t, got.token_ids[t + 1, j]] - want_lp[t, j]) < 1e-5, (t, j)


@pytest.fixture(scope="module")
def model():
    return small_qwen3()


def test_exact_against_full_log_softmax(model):
    teacher = HFTeacher(model, device="cpu")
    assert isinstance(teacher, Teacher)
    seqs = sequences([2, 9, 40, 17])
    k = 8
    out = teacher.topk(seqs, k)
    for seq, got in zip(seqs, out):
        ids, lp, tail, full = reference(model, seq, k)
        assert got.length == len(seq) and got.k == k
        assert got.token_ids.dtype == np.int32 and got.logprobs.dtype == np.float32
        assert (got.token_ids[0] == MISSING_ID).all() and np.isneginf(got.logprobs[0]).all()
        assert got.tail_logprob[0] == 0
        assert_rows_match(got, ids, lp, full)
        np.testing.assert_allclose(got.tail_logprob[1:], tail, atol=1e-5, rtol=0)
        assert (np.diff(got.logprobs[1:], axis=-1) <= 0).all()  # most likely first


def test_chunked_equals_unchunked(model):
    seqs = sequences([33, 12, 5])
    whole = HFTeacher(model, device="cpu").topk(seqs, 6)
    tiny_chunks = HFTeacher(model, device="cpu", chunk_bytes=3 * 4 * VOCAB)  # 3 positions per chunk
    assert tiny_chunks.chunk_rows == 3
    for a, b in zip(whole, tiny_chunks.topk(seqs, 6)):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
        np.testing.assert_allclose(a.tail_logprob, b.tail_logprob, atol=1e-6, rtol=0)


def test_batch_of_different_lengths_equals_one_by_one(model):
    seqs = sequences([3, 50, 1, 21, 0, 8, 50, 2], seed=2)
    batched = HFTeacher(model, device="cpu", batch_size=8).topk(seqs, 5)
    single = HFTeacher(model, device="cpu", batch_size=1)
    # also a token budget that splits the batch unevenly
    budget = HFTeacher(model, device="cpu", batch_size=8, max_batch_tokens=60).topk(seqs, 5)
    for seq, a, c in zip(seqs, batched, budget):
        (b,) = single.topk([seq], 5)
        for other in (b, c):
            assert a.length == other.length == len(seq)
            np.testing.assert_allclose(a.logprobs, other.logprobs, atol=1e-5, rtol=0)
            np.testing.assert_allclose(a.tail_logprob, other.tail_logprob, atol=1e-5, rtol=0)
            if len(seq) > 1:
                _, _, _, full = reference(model, seq, 5)
                for t, j in zip(*np.nonzero(a.token_ids != other.token_ids)):
                    assert abs(full[t - 1, a.token_ids[t, j]] - full[t - 1, other.token_ids[t, j]]) < 1e-5


def test_short_sequences_and_row_zero(model):
    teacher = HFTeacher(model, device="cpu")
    empty, one, two = teacher.topk([[], [5], [5, 6]], 4)
    assert empty.length == 0 and empty.k == 4
    assert one.length == 1 and (one.token_ids == MISSING_ID).all() and one.tail_logprob[0] == 0
    assert two.length == 2 and (two.token_ids[1] >= 0).all() and np.isfinite(two.logprobs[1]).all()
    assert teacher.topk([], 4) == []


def test_tail_is_exact_when_topk_holds_nearly_all_mass():
    peaked = small_qwen3(logit_scale=150.0)
    seq = sequences([24], seed=3)[0]
    (got,) = HFTeacher(peaked, device="cpu").topk([seq], 10)
    ids, lp, tail, full = reference(peaked, seq, 10)
    assert (tail < -20).sum() >= 3, (
        "the test needs rows whose tail mass is below float32's 1 - sum resolution"
    )
    assert_rows_match(got, ids, lp, full, lp_atol=1e-4)
    np.testing.assert_allclose(got.tail_logprob[1:], tail, atol=1e-3, rtol=0)
    # what 1 - sum(p) would give is useless here: the float32 top-k mass rounds to 1
    mass = np.exp(got.logprobs[1:].astype(np.float32)).sum(-1, dtype=np.float32)
    assert (np.abs(np.log(np.clip(1 - mass, 1e-30, 1)) - tail) > 1).any()


def test_k_above_vocab_pads_and_has_no_tail():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=6, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=32)  # fmt: skip
    model = Qwen3ForCausalLM(cfg).eval()
    (got,) = HFTeacher(model, device="cpu").topk([[1, 2, 3]], 8)
    assert (got.token_ids[1:, :6] >= 0).all() and (got.token_ids[1:, 6:] == MISSING_ID).all()
    assert np.isneginf(got.logprobs[1:, 6:]).all() and np.isneginf(got.tail_logprob[1:]).all()
    np.testing.assert_allclose(np.exp(got.logprobs[1:, :6].astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_falls_back_to_full_logits_when_head_split_is_not_exact(model):
    """A config that the split head would misapply (a softcap Qwen3 does not use) must not change results."""
    import copy

    odd = copy.deepcopy(model)
    odd.config.final_logit_softcapping = 2.0
    teacher = HFTeacher(odd, device="cpu")
    seq = sequences([19], seed=4)[0]
    (got,) = teacher.topk([seq], 5)
    assert teacher._split_head is False
    ids, lp, tail, full = reference(model, seq, 5)
    assert_rows_match(got, ids, lp, full)
    np.testing.assert_allclose(got.tail_logprob[1:], tail, atol=1e-5)


def test_errors_are_clear(model):
    teacher = HFTeacher(model, device="cpu")
    with pytest.raises(TeacherError, match="outside the teacher vocabulary"):
        teacher.topk([[1, VOCAB]], 3)
    with pytest.raises(TeacherError, match="max_model_len"):
        teacher.topk([[1] * 300], 3)
    with pytest.raises(TeacherError, match="negative"):
        teacher.topk([[1, -2]], 3)
    with pytest.raises(TeacherError, match="k must be"):
        teacher.topk([[1, 2]], 0)


def test_load_from_directory_and_name(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    teacher = build_teacher(
        TeacherConfig(kind="hf", model=str(tmp_path / "m"), device="cpu", dtype="float32")
    )
    assert isinstance(teacher, HFTeacher)
    assert teacher.name.startswith(f"hf:{tmp_path / 'm'}@local-") and teacher.name.endswith(":float32")
    assert teacher.vocab_size == VOCAB
    seq = sequences([12], seed=5)[0]
    (a,) = teacher.topk([seq], 4)
    (b,) = HFTeacher(model, device="cpu").topk([seq], 4)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    with pytest.raises(TeacherError, match="cannot load"):
        HFTeacher(str(tmp_path / "missing"), device="cpu")
