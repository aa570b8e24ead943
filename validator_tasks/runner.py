"""The evaluation runner: a length ladder of generated tasks, answered by one model at a time under
a time budget, scored, and gathered into a `Report`.

    from validator_tasks.runner import evaluate_models
    report = evaluate_models(EvalConfig(model=["ckpt/"], lengths="4k,16k", tasks="ruler"))

`evaluate(predictor, tokenizer, cfg)` is the core, for any `Predictor` (a model in this process, a
model in its own process, or a test double). For each length, shortest first, every task is asked
`samples` times; after a length, the ladder stops if its mean accuracy is under `stop_below`.
Sample generation (ours) does not count against a model's budget; loading and answering (the
model's) do. When the budget is spent the model is stopped, the sample in flight and every sample
not yet asked score 0, and the run goes on with the next model.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from validator_tasks.base import Sample, generate
from validator_tasks.config import EvalConfig, format_length, sample_seeds
from validator_tasks.models import BudgetExceeded, ModelLoadError, Predictor
from validator_tasks.report import ModelResult, Report, SampleRecord, summarise
from validator_tasks.scoring import score
from validator_tasks.worker import WorkerFailed

log = logging.getLogger("validator_tasks")


def tokenizer_key(tokenizer) -> str:
    """Identifies a vocabulary, so that samples are generated once per tokenizer and reused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SampleBank:
    """Generated samples, keyed by (tokenizer, task, length, seed), shared by the models of a run."""

    samples: dict[tuple[str, str, int, int], Sample] = field(default_factory=dict)
    seconds: float = 0.0
    # id -> (tokenizer, key): serialising a large vocabulary takes a while, so once per tokenizer;
    # holding the tokenizer keeps its id from being reused by another object.
    _keys: dict[int, tuple[Any, str]] = field(default_factory=dict, repr=False)

    def get(self, tokenizer, task: str, length: int, seed: int) -> Sample:
        if id(tokenizer) not in self._keys:
            self._keys[id(tokenizer)] = (tokenizer, tokenizer_key(tokenizer))
        key = (self._keys[id(tokenizer)][1], task, length, seed)
        if key not in self.samples:
            start = time.perf_counter()
            self.samples[key] = generate(task, length, seed, tokenizer)
            self.seconds += time.perf_counter() - start
        return self.samples[key]


def _record(sample: Sample, status: str, **fields: Any) -> SampleRecord:
    return SampleRecord(
        task=sample.task,
        length=sample.target_length,
        seed=sample.seed,
        prompt_tokens=sample.prompt_tokens,
        status=status,
        answers=list(sample.answers),
        score=fields.pop("score", 0.0),
        **fields,
    )


def _unasked(task: str, length: int, seed: int, message: str) -> SampleRecord:
    return SampleRecord(
        task=task,
        length=length,
        seed=seed,
        prompt_tokens=0,
        status="not_run",
        score=0.0,
        answers=[],
        message=message,
    )


def evaluate(
    predictor: Predictor,
    tokenizer,
    cfg: EvalConfig,
    *,
    name: str,
    deadline: float | None = None,
    bank: SampleBank | None = None,
    info: dict[str, Any] | None = None,
    started: float | None = None,
    load_seconds: float = 0.0,
) -> ModelResult:
    """Run the ladder with `predictor`; `deadline` is a `time.monotonic()` value (None: no limit)."""
    from tqdm import tqdm

    bank = bank or SampleBank()
    started = time.monotonic() if started is None else started
    seeds = sample_seeds(cfg.base_seed, cfg.samples)
    records: list[SampleRecord] = []
    skipped: dict[int, str] = {}
    stop_reason = ""  # once set, nothing more is asked and the rest is recorded as not run
    status, message = "ok", ""
    asked, score_sum = 0, 0.0  # for the progress bar's running accuracy
    total = len(cfg.lengths) * len(cfg.tasks) * len(seeds)
    bar = tqdm(total=total, desc=name[-40:], unit="sample", disable=not cfg.progress, leave=True)
    try:
        for length in cfg.lengths:
            if stop_reason:
                skipped[length] = stop_reason
                records += [_unasked(t, length, s, stop_reason) for t in cfg.tasks for s in seeds]
                continue
            bar.set_postfix_str(f"{format_length(length)} tokens")
            for task in cfg.tasks:
                for seed in seeds:
                    if stop_reason:
                        records.append(_unasked(task, length, seed, stop_reason))
                        continue
                    gen_start = time.monotonic()
                    sample = bank.get(tokenizer, task, length, seed)
                    if deadline is not None:  # generating the sample is our time, not the model's
                        deadline += time.monotonic() - gen_start
                    start = time.perf_counter()
                    try:
                        pred = predictor.predict(sample, deadline)
                    except BudgetExceeded:
                        status, message = "timeout", f"time budget of {cfg.time_budget:.0f}s spent"
                        stop_reason = message
                        records.append(
                            _record(sample, "timeout", message=message, seconds=time.perf_counter() - start)
                        )
                    except WorkerFailed as e:
                        status, message = "error", str(e)
                        stop_reason = f"the model process failed: {str(e).splitlines()[0]}"
                        records.append(
                            _record(sample, "error", message=str(e), seconds=time.perf_counter() - start)
                        )
                    except Exception as e:  # the model's failure on one sample; the next may work
                        log.warning("%s: %s at %d tokens failed: %s", name, task, length, e)
                        if status == "ok":
                            status, message = "error", f"{type(e).__name__}: {e}"
                        records.append(
                            _record(
                                sample,
                                "error",
                                message=f"{type(e).__name__}: {e}",
                                seconds=time.perf_counter() - start,
                            )
                        )
                    else:
                        records.append(
                            _record(
                                sample,
                                "ok",
                                score=score(sample, pred.text),
                                prediction=pred.text,
                                seconds=time.perf_counter() - start,
                                prefill_seconds=pred.prefill_seconds,
                                decode_seconds=pred.decode_seconds,
                                generated_tokens=pred.generated_tokens,
                                peak_memory_bytes=pred.peak_memory_bytes,
                                cache_bytes=pred.cache_bytes,
                            )
                        )
                    asked, score_sum = asked + 1, score_sum + records[-1].score
                    bar.update(1)
                    bar.set_postfix_str(f"{format_length(length)} tokens, acc {score_sum / asked:.2f}")
            at_length = [r for r in records if r.length == length]
            accuracy = sum(r.score for r in at_length) / len(at_length)
            log.info("%s: %s tokens: accuracy %.3f", name, format_length(length), accuracy)
            if not stop_reason and cfg.stop_below is not None and accuracy < cfg.stop_below:
                stop_reason = f"not run: accuracy {accuracy:.3f} at {format_length(length)} is below stop_below={cfg.stop_below}"
    finally:
        bar.close()
    cells, lengths = summarise(records, cfg.tasks, cfg.lengths, skipped)
    return ModelResult(
        model=name,
        kind=(info or {}).get("kind", ""),
        parameters=(info or {}).get("parameters", {}),
        status=status,
        message=message,
        score=sum(c.accuracy for c in cells) / len(cells),
        seconds=time.monotonic() - started,
        load_seconds=load_seconds,
        budget_seconds=cfg.time_budget,
        lengths=lengths,
        cells=cells,
        samples=records,
    )


def _failed(
    name: str, cfg: EvalConfig, message: str, started: float, status: str = "load_error"
) -> ModelResult:
    seeds = sample_seeds(cfg.base_seed, cfg.samples)
    records = [_unasked(t, n, s, message) for n in cfg.lengths for t in cfg.tasks for s in seeds]
    cells, lengths = summarise(records, cfg.tasks, cfg.lengths, {n: message for n in cfg.lengths})
    return ModelResult(
        model=name,
        status=status,
        message=message,
        score=0.0,
        seconds=time.monotonic() - started,
        budget_seconds=cfg.time_budget,
        lengths=lengths,
        cells=cells,
        samples=records,
    )


def evaluate_path(
    model: str, cfg: EvalConfig, bank: SampleBank | None = None, *, factory: str | None = None
) -> ModelResult:
    """Load the model at `model` (in its own process when `cfg.isolate`) and run the ladder. Never
    raises for a bad model: loading failures and timeouts become a failing result."""
    import contextlib

    from validator_tasks.models import load_tokenizer
    from validator_tasks.worker import IsolatedPredictor

    started = time.monotonic()
    deadline = started + cfg.time_budget
    too_slow = f"loading took longer than the time budget ({cfg.time_budget:.0f}s)"
    try:
        tokenizer = load_tokenizer(cfg.tokenizer or model)
    except ModelLoadError as e:
        return _failed(model, cfg, str(e), started)
    with contextlib.ExitStack() as resources:
        if cfg.isolate:
            predictor = resources.enter_context(
                IsolatedPredictor(
                    model,
                    tokenizer=cfg.tokenizer,
                    device=cfg.device,
                    dtype=cfg.dtype,
                    chunk=cfg.chunk,
                    baseline_chunk=cfg.baseline_chunk,
                    max_new_tokens=cfg.max_new_tokens,
                    threads=cfg.threads,
                    factory=factory,
                )
            )
            try:
                info = predictor.start(deadline)
            except BudgetExceeded:
                return _failed(model, cfg, too_slow, started, "timeout")
            except WorkerFailed as e:
                return _failed(model, cfg, str(e), started)
        else:
            try:
                predictor, info = load_predictor(model, tokenizer, cfg)
            except ModelLoadError as e:
                return _failed(model, cfg, str(e), started)
            if time.monotonic() > deadline:
                return _failed(model, cfg, too_slow, started, "timeout")
        return evaluate(
            predictor, tokenizer, cfg, name=model, deadline=deadline, bank=bank, info=info,
            started=started, load_seconds=time.monotonic() - started,
        )  # fmt: skip


def load_predictor(model: str, tokenizer, cfg: EvalConfig):
    """A `StreamingPredictor` over the model at `model`, in this process, and its description."""
    import torch

    from validator_tasks.models import StreamingPredictor, load_model, model_kind, parameter_counts

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_model(model, device=cfg.device, dtype=cfg.dtype)
    predictor = StreamingPredictor(
        loaded,
        tokenizer,
        chunk=cfg.chunk,
        baseline_chunk=cfg.baseline_chunk,
        max_new_tokens=cfg.max_new_tokens,
    )
    return predictor, {"kind": model_kind(loaded), "parameters": parameter_counts(loaded)}


def machine() -> dict[str, str]:
    import os
    import platform

    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": str(os.cpu_count()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def evaluate_models(
    cfg: EvalConfig, *, on_model: Callable[[Report], None] | None = None, factory: str | None = None
) -> Report:
    """Every model of `cfg` in turn on the same samples; `on_model(report)` after each (the CLI
    writes the report there, so an interrupted run keeps the models already done)."""
    import datetime as dt

    bank = SampleBank()
    report = Report(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        base_seed=cfg.base_seed,
        tasks=list(cfg.tasks),
        lengths=list(cfg.lengths),
        samples_per_cell=cfg.samples,
        config=cfg.model_dump(),
        machine=machine(),
        models=[],
    )
    for model in cfg.model:
        result = evaluate_path(model, cfg, bank, factory=factory)
        log.info("%s: score %.3f (%s) in %.0fs", model, result.score, result.status, result.seconds)
        report.models.append(result)
        if on_model is not None:
            on_model(report)
    return report
