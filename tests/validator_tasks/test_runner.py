"""The evaluation runner: one streaming code path for Quasar and transformers models, the length
ladder, enforced time budgets, reports, and the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from validator_tasks import TASKS
from validator_tasks.base import Sample
from validator_tasks.config import EvalConfig, parse_length, sample_seeds, seed_from_block_hash
from validator_tasks.models import BudgetExceeded, Prediction, StreamingPredictor, load_model
from validator_tasks.report import format_table, plot_heatmap, read_report, write_report
from validator_tasks.runner import SampleBank, evaluate, evaluate_models, evaluate_path

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKES = "tests.validator_tasks.fake_models:make"
HASH = "0x" + "ab" * 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Quasar checkpoint and a tiny transformers Qwen3, both with a local tokenizer, plus
    directories for the fake model processes (tokenizer only)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from distill.tiny import local_corpus, train_tokenizer
    from quasar import QuasarConfig, QuasarForCausalLM
    from quasar.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(local_corpus()[:200], 1000)
    torch.manual_seed(0)
    save_checkpoint(QuasarForCausalLM(QuasarConfig.from_preset("tiny", vocab_size=1024)), root / "quasar")
    cfg = Qwen3Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=8192,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(root / "qwen3")
    for name in ("quasar", "qwen3", "model-hang", "model-crash", "model-loadfail", "model-slow"):
        tok.save_pretrained(root / name)
    return {"root": root, "tokenizer": tok}


def _cfg(**kw) -> EvalConfig:
    base = dict(model=["m"], tasks=["niah_single"], lengths=[600], samples=1, progress=False, isolate=False)
    return EvalConfig(**{**base, **kw})


class Oracle:
    """Reads the answer from the sample (the runner strips it before a model process sees it)."""

    def __init__(self, right_until: int | None = None):
        self.right_until = right_until

    def predict(self, sample: Sample, deadline=None) -> Prediction:
        right = self.right_until is None or sample.target_length <= self.right_until
        return Prediction(text=", ".join(sample.answers) if right else "I do not know.")


# ------------------------------------------------------------------------------------------------
# configuration


def test_config_parses_ladders_groups_and_rejects_bad_values() -> None:
    cfg = _cfg(lengths="16K,4k,1m,5000", tasks="babilong,niah_single")
    assert cfg.lengths == [4096, 5000, 16384, 1024**2]
    assert cfg.tasks == ["babilong_qa1", "babilong_qa2", "babilong_qa3", "niah_single"]
    assert _cfg(tasks="all").tasks == sorted(TASKS)
    assert parse_length("64k") == 65536
    for bad, match in (
        (dict(lengths="4q"), "cannot read '4q' as a length"),
        (dict(lengths="4k,4096"), "lengths repeat"),
        (dict(lengths="32"), "at least 64"),
        (dict(tasks="niah_single,nope"), "unknown task"),
        (dict(block_hash="0x1234"), "64 hex digits"),
        (dict(time_budget=0), "greater than 0"),
        (dict(stop_below=1.5), "less than or equal to 1"),
    ):
        with pytest.raises(ValidationError, match=match):
            _cfg(**bad)


def test_block_hash_seeds_agree_and_differ() -> None:
    a = seed_from_block_hash(HASH)
    assert a == seed_from_block_hash(HASH[2:]) == _cfg(block_hash=HASH, seed=5).base_seed
    assert a != seed_from_block_hash("0x" + "ac" * 32)
    seeds = sample_seeds(a, 4)
    assert seeds == sample_seeds(a, 4) and len(set(seeds)) == 4 and seeds[:2] == sample_seeds(a, 2)


# ------------------------------------------------------------------------------------------------
# the ladder, scoring and budgets (test predictors, in this process)


def test_oracle_scores_one_and_wrong_zero_on_every_task(models) -> None:
    cfg = _cfg(tasks="all", lengths=[600, 1200], samples=2)
    right = evaluate(Oracle(), models["tokenizer"], cfg, name="oracle")
    assert right.status == "ok" and right.score == 1.0
    assert all(c.accuracy == 1.0 and c.n == c.n_ok == 2 for c in right.cells)
    assert len(right.cells) == len(TASKS) * 2 and len(right.samples) == len(TASKS) * 2 * 2
    wrong = evaluate(Oracle(right_until=0), models["tokenizer"], cfg, name="wrong")
    assert wrong.score == 0.0 and all(s.status == "ok" and s.score == 0.0 for s in wrong.samples)
    for s in right.samples:  # every prompt hits its length within 1%
        assert abs(s.prompt_tokens - s.length) <= 0.01 * s.length


def test_ladder_stops_below_threshold_and_counts_the_rest_as_zero(models) -> None:
    cfg = _cfg(tasks="niah_single,variable_tracking", lengths=[600, 1200, 2400], samples=2, stop_below=0.5)
    result = evaluate(Oracle(right_until=600), models["tokenizer"], cfg, name="short-only")
    by_length = {s.length: s for s in result.lengths}
    assert by_length[600].accuracy == 1.0 and by_length[600].status == "ran"
    assert by_length[1200].accuracy == 0.0 and by_length[1200].status == "ran"
    assert by_length[2400].status == "skipped" and "below stop_below=0.5" in by_length[2400].reason
    assert all(s.status == "not_run" and s.score == 0 for s in result.samples if s.length == 2400)
    assert result.score == pytest.approx(1 / 3)


def test_samples_are_shared_between_models_and_deterministic(models) -> None:
    bank = SampleBank()
    cfg = _cfg(tasks="niah_single,babilong_qa2", lengths=[600, 1200], samples=2, block_hash=HASH)
    a = evaluate(Oracle(), models["tokenizer"], cfg, name="a", bank=bank)
    generated = len(bank.samples)
    b = evaluate(Oracle(right_until=600), models["tokenizer"], cfg, name="b", bank=bank)
    assert len(bank.samples) == generated == 8  # b reused a's samples
    fresh = evaluate(Oracle(), models["tokenizer"], cfg, name="a", bank=SampleBank())
    assert [s.model_dump(exclude={"seconds"}) for s in fresh.samples] == [
        s.model_dump(exclude={"seconds"}) for s in a.samples
    ]
    assert [s.seed for s in a.samples] == [s.seed for s in b.samples]


class _Slow:
    """Honours its deadline between 'forward calls', as StreamingPredictor does."""

    def predict(self, sample, deadline=None) -> Prediction:
        for _ in range(4):
            if deadline is not None and time.monotonic() > deadline:
                raise BudgetExceeded("time budget spent")
            time.sleep(0.1)
        return Prediction(text="no")


class _Broken:
    def predict(self, sample, deadline=None) -> Prediction:
        raise RuntimeError("CUDA out of memory (simulated)")


def test_budget_stops_a_slow_model_and_errors_score_zero(models) -> None:
    cfg = _cfg(tasks="niah_single,variable_tracking", lengths=[600, 1200], samples=2, time_budget=1.0)
    start = time.monotonic()
    result = evaluate(_Slow(), models["tokenizer"], cfg, name="slow", deadline=time.monotonic() + 1.0)
    assert time.monotonic() - start < 5
    statuses = [s.status for s in result.samples]
    assert result.status == "timeout" and "time budget" in result.message
    assert statuses.count("timeout") == 1 and statuses[: statuses.index("timeout")] == [
        "ok"
    ] * statuses.index("timeout")
    assert set(statuses[statuses.index("timeout") + 1 :]) == {"not_run"}
    assert result.score == 0.0 and len(result.samples) == 8
    broken = evaluate(_Broken(), models["tokenizer"], cfg, name="broken")
    assert broken.status == "error" and "out of memory" in broken.message
    assert all(s.status == "error" and s.score == 0 for s in broken.samples)


# ------------------------------------------------------------------------------------------------
# the streaming code path on real models


def _greedy_reference(model, ids: torch.Tensor, steps: int, eos: set[int]) -> list[int]:
    """Greedy decoding by full forwards over the growing sequence, no cache."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.cat([ids, torch.tensor([out], dtype=torch.long)], 1)).logits
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
    return out


@pytest.mark.parametrize("kind", ["quasar", "qwen3"])
def test_streaming_in_chunks_equals_full_forward_greedy(models, kind) -> None:
    tok = models["tokenizer"]
    model = load_model(models["root"] / kind, device="cpu")
    text = " ".join(["The lantern keeper wrote the number 4721 in the ledger."] * 30) + " The number is"
    ids = tok(text, return_tensors="pt")["input_ids"]
    predictor = StreamingPredictor(model, tok, chunk=37, baseline_chunk=0)
    expected = _greedy_reference(model, ids, 12, predictor.eos_ids)
    whole = predictor.predict_text(text, 12)
    assert tok.decode(expected) == whole.text and whole.input_tokens == ids.shape[1]
    for chunk in (1, 37, 4096):
        other = StreamingPredictor(model, tok, chunk=chunk, baseline_chunk=chunk)
        assert other.predict_text(text, 12).text == whole.text
    if kind == "qwen3":  # and equal to transformers' own generate
        gen = model.generate(ids, do_sample=False, max_new_tokens=12, attention_mask=torch.ones_like(ids))
        assert tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True) == whole.text


def test_quasar_cache_is_flat_in_length_and_baseline_grows(models) -> None:
    tok = models["tokenizer"]
    sizes = {}
    for kind in ("quasar", "qwen3"):
        p = StreamingPredictor(load_model(models["root"] / kind), tok, chunk=64, baseline_chunk=0)
        sizes[kind] = [p.predict_text("word " * n, 2).cache_bytes for n in (256, 1024)]
    assert sizes["quasar"][1] <= 1.1 * sizes["quasar"][0]
    assert sizes["qwen3"][1] > 3 * sizes["qwen3"][0]


def test_streaming_predictor_honours_deadline_and_rejects_non_finite(models) -> None:
    tok = models["tokenizer"]
    model = load_model(models["root"] / "quasar")
    with pytest.raises(BudgetExceeded):
        StreamingPredictor(model, tok).predict_text("word " * 50, 4, deadline=time.monotonic() - 1)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    result = evaluate(StreamingPredictor(model, tok), tok, _cfg(), name="nan")
    assert result.status == "error" and "non-finite" in result.samples[0].message


# ------------------------------------------------------------------------------------------------
# model processes: loading, killing, crashing; the run goes on


def test_model_processes_hang_crash_and_load_failures_do_not_stop_the_run(models, monkeypatch) -> None:
    import validator_tasks.worker as worker

    monkeypatch.setattr(worker, "GRACE_SECONDS", 1.0)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    root = models["root"]
    names = ["model-hang", "model-crash", "model-loadfail", "missing-dir", "quasar"]
    budget = 20.0  # the hung model costs all of it; the real one needs a fraction
    cfg = _cfg(
        model=[str(root / n) for n in names],
        tasks="niah_single,variable_tracking",
        isolate=True,
        time_budget=budget,
        max_new_tokens=8,
    )
    start = time.monotonic()
    report = evaluate_models(cfg, factory=FAKES)
    hang, crash, loadfail, missing, real = report.models
    assert (
        hang.status == "timeout" and hang.seconds < budget + 1.0 + 5 and hang.samples[0].status == "timeout"
    )
    assert crash.status == "error" and "exited with code 3" in crash.message, crash.message
    assert crash.samples[0].status == "error" and crash.samples[1].status == "not_run"
    assert loadfail.status == "load_error" and "deliberately unloadable" in loadfail.message
    assert missing.status == "load_error" and "does not exist" in missing.message
    assert real.status == "ok" and real.kind == "quasar" and all(s.status == "ok" for s in real.samples)
    assert all(m.score == 0.0 for m in (hang, crash, loadfail, missing))
    assert time.monotonic() - start < 90
    # the model process never saw the answers, and gave the same text as in this process (with a
    # budget no load can exhaust: under load the 20 s one ran out and left the predictions empty)
    inproc = evaluate_path(
        str(root / "quasar"), cfg.model_copy(update={"isolate": False, "time_budget": 3600.0})
    )
    assert [s.prediction for s in inproc.samples] == [s.prediction for s in real.samples]


def test_isolated_predictor_kills_a_hung_process(models, monkeypatch) -> None:
    import validator_tasks.worker as worker

    monkeypatch.setattr(worker, "GRACE_SECONDS", 0.5)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    sample = Sample("niah_single", 600, 0, "prompt", " Answer:", ["x"], "string_match_all")
    with worker.IsolatedPredictor(str(models["root"] / "model-hang"), factory=FAKES) as p:
        p.start(time.monotonic() + 60)
        pid = p.proc.pid
        start = time.monotonic()
        with pytest.raises(BudgetExceeded, match="killed"):
            p.predict(sample, time.monotonic() + 1.0)
        assert time.monotonic() - start < 3
        assert p.proc.poll() is not None  # reaped
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


# ------------------------------------------------------------------------------------------------
# reports and the command line


def test_report_round_trip_table_and_heatmap(models, tmp_path) -> None:
    root = models["root"]
    cfg = _cfg(
        model=[str(root / "quasar"), str(root / "qwen3")],
        tasks="niah_single,babilong_qa1",
        lengths=[600, 1200],
    )
    report = evaluate_models(cfg)
    path = write_report(report, tmp_path / "r.json")
    assert read_report(path) == report
    table = format_table(report)
    for needle in ("niah_single", "babilong_qa1", "600", "1200", "quasar", "transformers", "s/sample"):
        assert needle in table
    png = plot_heatmap(report, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a q24-longctx-report/1 report"):
        read_report(tmp_path / "bad.json")


def test_cli_eval_and_show(models, tmp_path, capsys) -> None:
    from validator_tasks.cli import main

    out = tmp_path / "report.json"
    argv = ["eval", "--model", str(models["root"] / "quasar"), "--tasks", "niah_single,variable_tracking"]
    argv += ["--lengths", "600,1k", "--samples", "1", "--out", str(out), "--no-progress", "--no-isolate"]
    assert main([*argv, "--block_hash", HASH]) == 0
    printed = capsys.readouterr().out
    assert "variable_tracking" in printed and out.exists() and out.with_suffix(".png").exists()
    report = read_report(out)
    assert report.lengths == [600, 1024] and report.base_seed == seed_from_block_hash(HASH)
    assert main(["show", str(out), "--plot", str(tmp_path / "h.png")]) == 0
    assert "niah_single" in capsys.readouterr().out and (tmp_path / "h.png").exists()
    assert main([*argv, "--lengths", "4q"]) == 2
    assert "cannot read '4q'" in capsys.readouterr().err
    assert main([*argv, "--model", str(tmp_path / "typo")]) == 1
    assert "typo" in capsys.readouterr().err and "does not exist" in read_report(out).models[0].message
    assert main(["show", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
