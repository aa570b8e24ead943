"""Streaming equivalence: one pass == chunked passes with the cache == token by token, and the
cache stays the same size however long the stream."""

import random

import pytest
import torch

from tests.conftest import tiny_model

SEGMENT = 16


def stream(model, ids: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    cache, parts, pos = None, [], 0
    with torch.no_grad():
        for n in sizes:
            out = model(ids[:, pos : pos + n], past_key_values=cache, use_cache=True)
            cache, pos = out.past_key_values, pos + n
            parts.append(out.logits)
    assert pos == ids.shape[1]
    return torch.cat(parts, dim=1)


def random_sizes(total: int, seed: int) -> list[int]:
    rng, sizes = random.Random(seed), []
    while sum(sizes) < total:
        sizes.append(
            min(rng.choice([1, 3, 7, SEGMENT - 1, SEGMENT, SEGMENT + 5, 29, 40]), total - sum(sizes))
        )
    return sizes


@pytest.mark.parametrize("position_mode", ["rope", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_pass_equals_random_chunks_and_token_by_token(position_mode, seed):
    model = tiny_model(seed, position_mode=position_mode)
    T = 4 * SEGMENT + 9
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(ids).logits
    chunked = stream(model, ids, random_sizes(T, seed))
    stepwise = stream(model, ids, [1] * T)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=2e-5)


def test_generate_with_cache_matches_greedy_recomputation():
    model = tiny_model(3)
    prompt = torch.randint(0, 256, (1, 2 * SEGMENT + 3), generator=torch.Generator().manual_seed(3))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat((expected, nxt), dim=1)
    assert torch.equal(generated, expected)


def test_cache_size_is_bounded_and_periodic_in_stream_length():
    model = tiny_model(4)
    sizes = {}
    cache = None
    with torch.no_grad():
        for step in range(12 * SEGMENT):
            out = model(torch.randint(0, 256, (1, 1)), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            sizes[step + 1] = cache.nbytes()
        # One more long call: the bank is fixed-size, only the unfinished segment (< SEGMENT rows) varies.
        cache = model(
            torch.randint(0, 256, (1, 100 * SEGMENT)), past_key_values=cache, use_cache=True
        ).past_key_values
    assert cache.seen_tokens == 112 * SEGMENT
    assert cache.nbytes() == sizes[SEGMENT]  # a whole number of segments seen in both cases
    assert max(sizes.values()) == sizes[SEGMENT - 1]  # the largest unfinished segment
    for n in range(1, 11 * SEGMENT):
        assert sizes[n] == sizes[n + SEGMENT], f"cache size at {n} and {n + SEGMENT} tokens differ"


def test_cache_carries_every_state_kind():
    model = tiny_model(5)
    with torch.no_grad():
        cache = model(torch.randint(0, 256, (1, SEGMENT + 3)), use_cache=True).past_key_values
    quasar_layer, gla_layer = cache.layers[0], cache.layers[1]
    assert set(quasar_layer["mixer"]) == {"q_conv", "k_conv", "v_conv", "attn"}
    assert set(quasar_layer["memory"]) == {"bank", "partial_z", "partial_pool_logit", "partial_log_saliency"}
    assert quasar_layer["memory"]["partial_z"].shape[1] == 3
    assert set(gla_layer["mixer"]) == {"gla"}
    assert len(cache.layers) == model.config.num_loops * model.config.num_hidden_layers
    assert quasar_layer["mixer"]["attn"].dtype == torch.float32


def test_padded_batches_are_rejected_with_a_clear_error():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="padded batches"):
        model(ids, attention_mask=mask)
    model(ids, attention_mask=torch.ones_like(mask))  # an all-ones mask is fine
