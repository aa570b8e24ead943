"""The validator's round: sync, read commitments, pre-check and download, find copies, score on
KL fidelity and long context, compare, fold into the moving average, set weights, persist.

A round is pinned to the block it started at: its block hash seeds the KL prompts and the
long-context samples, so every honest validator scores the same work and no miner can precompute
it. The state is saved after every submission, so a validator killed mid-round (SIGKILL
included) resumes the same round, with the same prompts, and never redoes or loses a score.
A bad submission (malformed, oversized, pickled, NaN-filled, wrongly shaped, slow, crashing)
gets a recorded reason and a zero; nothing a miner uploads can stop the round.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurons import node
from neurons.chain import ChainError, ChainUnavailable, Metagraph, RateLimited
from neurons.commitment import CommitmentError, parse
from neurons.config import ValidatorConfig
from neurons.scoring import Entry, softmax_weights, update_moving_average, win_rates
from neurons.state import (
    Origin,
    RoundState,
    StateStore,
    SubmissionResult,
    ValidatorState,
)
from neurons.store import StoreError, StoreUnavailable
from neurons.verify import Submission, earliest_owner, fingerprint, verify_checkpoint
from quasar.files import atomic_write
from validator_tasks.config import seed_from_block_hash

log = logging.getLogger(__name__)

MAX_ORIGINS = 4096  # checkpoints remembered for copy detection across rounds


@dataclass
class KLPrompts:
    """The round's prompts with the teacher's top-k on each (saved, so a resumed round reuses them)."""

    tokens: list[np.ndarray]
    topk: list  # distill.types.TopK per prompt


def select_prompts(
    texts_sources: list[str], tokenizer, seed: int, count: int, tokens: int, pool: int = 4096
) -> list[np.ndarray]:
    """`count` windows of `tokens` tokens drawn by `seed` from the first `pool` windows of the text."""
    from itertools import islice

    from distill.data import iter_samples, iter_texts

    windows = list(islice(iter_samples(iter_texts(texts_sources, "text"), tokenizer, tokens), pool))
    windows = [w for w in windows if len(w) == tokens]
    if len(windows) < count:
        raise ChainError(
            f"the KL prompt text holds {len(windows)} windows of {tokens} tokens, fewer than the "
            f"{count} prompts a round needs: give more text with --kl.sources or lower --kl.prompts"
        )
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(windows), size=count, replace=False)
    return [np.asarray(windows[i], dtype=np.int64) for i in sorted(picked)]


def _save_prompts(path: Path, prompts: KLPrompts) -> None:
    arrays = {}
    for i, (tok, tk) in enumerate(zip(prompts.tokens, prompts.topk, strict=True)):
        arrays[f"tokens_{i}"] = tok
        arrays[f"ids_{i}"] = tk.token_ids
        arrays[f"lp_{i}"] = tk.logprobs
        arrays[f"tail_{i}"] = tk.tail_logprob
    buffer = io.BytesIO()
    np.savez(buffer, count=np.asarray(len(prompts.tokens)), **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


def _load_prompts(path: Path) -> KLPrompts | None:
    from distill.types import TopK

    try:
        with np.load(path, allow_pickle=False) as data:
            n = int(data["count"])
            return KLPrompts(
                [data[f"tokens_{i}"] for i in range(n)],
                [TopK(data[f"ids_{i}"], data[f"lp_{i}"], data[f"tail_{i}"]) for i in range(n)],
            )
    except (OSError, KeyError, ValueError):
        return None


class Validator(node.NodeBase):
    role = "validator"

    cfg: ValidatorConfig
    _teacher = None  # built on first use

    def setup(self) -> None:
        self.competition = node.competition(self.cfg, len(self.tokenizer))
        self.states = StateStore(self.dir)
        self.state: ValidatorState = self.states.load(self.cfg.netuid, self.chain.hotkey)
        self.kl_sources = self.text_sources(self.cfg.kl.sources, "--kl.sources")
        m = self.metrics
        self.g_block = m.gauge("q24_block", "latest chain block seen")
        self.g_round = m.gauge("q24_validator_round", "current round number")
        self.g_weight = m.gauge("q24_validator_weight", "moving-average weight by hotkey", ["hotkey"])
        self.g_kl = m.gauge("q24_validator_mean_kl", "mean KL of the last evaluation by hotkey", ["hotkey"])
        self.c_evaluated = m.counter("q24_validator_submissions", "submissions judged, by status", ["status"])
        self.c_weights = m.counter(
            "q24_validator_set_weights", "set_weights attempts, by outcome", ["outcome"]
        )

    # -- helpers -------------------------------------------------------------------------------------

    @property
    def teacher(self):
        if self._teacher is None:
            from distill.teachers import build_teacher

            self._teacher = build_teacher(node.teacher_config(self.cfg, self.kit, self.device))
        return self._teacher

    def save(self) -> None:
        self.states.save(self.state)

    def close(self) -> None:
        if self._teacher is not None:
            self._teacher.close()
        super().close()

    def _round_dir(self, number: int) -> Path:
        return self.dir / "rounds" / f"{number:06d}"

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Rounds until stopped (or --max_rounds); returns the number of rounds completed here."""
        done = 0
        try:
            while not self.stopper.stopped:
                try:
                    self.retry_weights()
                    if self.state.current is None:
                        self.wait_for_next_round()
                        if self.stopper.stopped:
                            break
                        self.start_round()
                    self.run_round()
                    done += 1
                    if self.cfg.max_rounds is not None and done >= self.cfg.max_rounds:
                        break
                except ChainUnavailable as e:
                    log.warning("chain unavailable, retrying in 10 s: %s", e)
                    self.health.fail(str(e))
                    self.stopper.sleep(10)
        finally:
            self.close()
        return done

    def wait_for_next_round(self) -> None:
        last = self.state.last
        if last is None:
            return
        target = last.block + self.cfg.interval_blocks
        seconds_per_block = self.chain.limits().seconds_per_block
        while not self.stopper.stopped:
            block = self.chain.current_block()
            self.g_block.set(block)
            if block >= target:
                return
            self.health.beat("waiting", block=block, next_round_block=target)
            self.stopper.sleep(min(30.0, (target - block) * seconds_per_block))

    def start_round(self) -> None:
        block = self.chain.current_block()
        block_hash = self.chain.block_hash(block)
        number = (self.state.last.number + 1) if self.state.last else 1
        self.state.current = RoundState(
            number=number, block=block, block_hash=block_hash, seed=seed_from_block_hash(block_hash)
        )
        self.save()
        log.info("round %d starts at block %d (hash %s)", number, block, block_hash[:18])

    def run_round(self) -> None:
        current = self.state.current
        assert current is not None
        self.g_round.set(current.number)
        started = time.monotonic()
        if not current.scored:
            metagraph = self.chain.metagraph()
            commitments = self.chain.commitments()
            self.g_block.set(metagraph.block)
            if current.planned:
                log.info(
                    "resuming round %d: %d of %d judged",
                    current.number,
                    len(current.results),
                    len(current.planned),
                )
            else:
                current.planned = [
                    r.hotkey
                    for r in sorted(commitments.values(), key=lambda r: (r.block, r.hotkey))
                    if r.hotkey != self.chain.hotkey and metagraph.uid_of(r.hotkey) is not None
                ][: self.cfg.scoring.max_models]
                self.save()
            prompts = self.round_prompts(current)
            for hotkey in current.planned:
                if self.stopper.stopped:
                    return
                if hotkey in current.results:
                    continue
                record = commitments.get(hotkey)
                uid = metagraph.uid_of(hotkey)
                if record is None or uid is None:
                    continue  # gone since the plan was made
                result = self.judge(current, hotkey, uid, record.block, record.data, prompts)
                current.results[hotkey] = result
                self.c_evaluated.labels(status=result.status).inc()
                if result.mean_kl is not None:
                    self.g_kl.labels(hotkey=hotkey).set(result.mean_kl)
                self.save()
                self.health.beat("judging", round=current.number, hotkey=hotkey, status=result.status)
            self.score_round(current, metagraph)
        self.set_weights()
        self.finish_round(time.monotonic() - started)

    # -- one submission ------------------------------------------------------------------------------

    def round_prompts(self, current: RoundState) -> KLPrompts:
        path = self._round_dir(current.number) / "kl_prompts.npz"
        saved = _load_prompts(path) if path.exists() else None
        if saved is not None and len(saved.tokens) == self.cfg.kl.prompts:
            return saved
        tokens = select_prompts(
            self.kl_sources, self.tokenizer, current.seed, self.cfg.kl.prompts, self.cfg.kl.prompt_tokens
        )
        topk = self.teacher.topk([t.tolist() for t in tokens], self.cfg.kl.k)
        prompts = KLPrompts(tokens, topk)
        _save_prompts(path, prompts)
        return prompts

    def judge(
        self, current: RoundState, hotkey: str, uid: int, block: int, data: str, prompts: KLPrompts
    ) -> SubmissionResult:
        started = time.monotonic()
        deadline = started + self.cfg.scoring.time_budget_s
        base = dict(hotkey=hotkey, uid=uid, block=block, data=data)
        key = f"{hotkey}|{data}"
        if key in self.state.verdicts:  # judged before and rejected: held until the commitment changes
            return self.state.verdicts[key].model_copy(update={"uid": uid, "block": block})
        try:
            result = self._judge(current, base, deadline, prompts)
        except ChainUnavailable:
            raise
        except Exception as e:  # anything a submission provokes scores zero; the round goes on
            log.exception("%s: evaluation failed", hotkey)
            result = SubmissionResult(
                **base, status="error", code="EVAL_ERROR", reason=f"{type(e).__name__}: {e}"
            )
        result.seconds = time.monotonic() - started
        if result.status == "rejected":
            self.state.verdicts[key] = result
        level = logging.INFO if result.status == "ok" else logging.WARNING
        log.log(
            level,
            "%s (uid %d): %s%s%s",
            hotkey,
            uid,
            result.status,
            f" [{result.code}] {result.reason}" if result.reason else "",
            f" mean KL {result.mean_kl:.4f}" if result.mean_kl is not None else "",
        )
        return result

    def _judge(
        self, current: RoundState, base: dict, deadline: float, prompts: KLPrompts
    ) -> SubmissionResult:
        hotkey = base["hotkey"]
        try:
            commitment = parse(base["data"])
        except CommitmentError as e:
            return SubmissionResult(**base, status="rejected", code="FORMAT", reason=str(e))
        if commitment.store != self.cfg.store_kind:
            return SubmissionResult(
                **base,
                status="rejected",
                code="FORMAT",
                reason=f"the commitment points at a {commitment.store} store; this subnet uses {self.cfg.store_kind}",
            )
        dest = self.dir / "downloads" / f"{commitment.repo.replace('/', '--')}@{commitment.revision}"
        try:
            if not dest.exists():
                tmp = dest.with_name(dest.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                self.store.download(
                    commitment.repo, commitment.revision, tmp, max_bytes=self.competition.max_download_bytes
                )
                tmp.rename(dest)
        except StoreUnavailable as e:  # the store's fault, not the miner's: not cached, retried next round
            return SubmissionResult(**base, status="error", code="DOWNLOAD", reason=str(e))
        except StoreError as e:
            return SubmissionResult(**base, status="rejected", code="DOWNLOAD", reason=str(e))
        verdict = verify_checkpoint(dest, commitment, hotkey, self.competition, device=self.device)
        if not verdict.ok:
            return SubmissionResult(
                **base,
                status="rejected",
                code=verdict.code,
                reason=verdict.reason,
                content_hash=verdict.content_hash,
            )
        model, digest = verdict.model, verdict.content_hash
        assert digest is not None
        prints = self.states.fingerprint(digest)
        if prints is None:  # deterministic for given content: computed once, kept on disk
            prints = fingerprint(model)
            self.states.save_fingerprint(digest, prints)
        origin = self.state.origins.get(digest)
        if origin is None or (base["block"], hotkey) < (origin.block, origin.hotkey):
            # the earliest commitment seen owns the weights, whatever order they were judged in
            self.state.origins[digest] = Origin(hotkey=hotkey, block=base["block"])
        # The origins include this content's owner (same hash) and every other checkpoint seen.
        owner = earliest_owner(Submission(hotkey, base["block"], digest, prints), self._known_originals())
        if owner is not None:
            return SubmissionResult(
                **base,
                status="copy",
                code="COPY",
                reason=f"the same weights as {owner.hotkey}'s submission committed at block {owner.block}",
                content_hash=digest,
                copy_of=owner.hotkey,
            )
        if time.monotonic() > deadline:
            return SubmissionResult(
                **base,
                status="timeout",
                code="SLOW",
                reason="time budget spent before scoring",
                content_hash=digest,
            )
        kl = self.kl_scores(model, prompts, deadline)
        del model
        if kl is None:
            return SubmissionResult(
                **base, status="timeout", code="SLOW",
                reason=f"KL evaluation did not finish within {self.cfg.scoring.time_budget_s:.0f}s",
                content_hash=digest,
            )  # fmt: skip
        if not np.isfinite(kl).all():
            return SubmissionResult(
                **base,
                status="rejected",
                code="WEIGHTS",
                reason="non-finite KL: the model's outputs are not finite",
                content_hash=digest,
            )
        if float(kl.mean()) > self.cfg.kl.max_kl:
            return SubmissionResult(
                **base, status="unfit", code="KL", content_hash=digest, kl=kl.tolist(),
                reason=f"mean KL {kl.mean():.3f} above --kl.max_kl {self.cfg.kl.max_kl}: not a distilled student",
            )  # fmt: skip
        longctx, problem = self.longctx_scores(dest, current, deadline)
        if problem:
            # not `"time" in problem`: "RuntimeError: ..." is an error, not a timeout
            timed_out = problem.startswith(("time budget", "long-context suite timeout"))
            return SubmissionResult(
                **base, status="timeout" if timed_out else "error", code="LONGCTX", reason=problem,
                content_hash=digest, kl=kl.tolist(), longctx=longctx,
            )  # fmt: skip
        return SubmissionResult(**base, status="ok", content_hash=digest, kl=kl.tolist(), longctx=longctx)

    def _known_originals(self) -> list[Submission]:
        return [
            Submission(origin.hotkey, origin.block, h, self.states.fingerprint(h))
            for h, origin in self.state.origins.items()
        ]

    def kl_scores(self, model, prompts: KLPrompts, deadline: float) -> np.ndarray | None:
        from validator_tasks.kl_eval import per_prompt_kl

        values = []
        for tokens, topk in zip(prompts.tokens, prompts.topk, strict=True):
            if time.monotonic() > deadline:
                return None
            (value,) = per_prompt_kl(
                model, [(tokens, topk)], score_from=self.cfg.kl.score_from, device=self.device
            )
            values.append(value)
        return np.asarray(values, dtype=np.float64)

    def longctx_scores(self, path: Path, current: RoundState, deadline: float) -> tuple[list[float], str]:
        """Per-sample scores on the round's long-context samples (in its own process, killed at the
        deadline), and a problem description ("" when the run went normally)."""
        if self.cfg.longctx.samples == 0:
            return [], ""
        from validator_tasks.config import EvalConfig
        from validator_tasks.runner import evaluate_path

        remaining = deadline - time.monotonic()
        if remaining <= 1:
            return [], "time budget spent before the long-context suite"
        cfg = EvalConfig(
            model=[str(path)],
            tokenizer=self.tokenizer_dir,
            tasks=self.cfg.longctx.tasks,
            lengths=self.cfg.longctx.lengths,
            samples=self.cfg.longctx.samples,
            block_hash=current.block_hash,
            time_budget=remaining,
            chunk=self.cfg.longctx.chunk,
            device="cuda" if self.device.startswith("cuda") else "cpu",
            isolate=True,
            progress=False,
        )
        result = evaluate_path(str(path), cfg)
        scores = [float(r.score) for r in result.samples]
        if result.status != "ok":
            return scores, f"long-context suite {result.status}: {result.message}"
        return scores, ""

    # -- scoring and weights ---------------------------------------------------------------------------

    def score_round(self, current: RoundState, metagraph: Metagraph) -> None:
        entries = [
            Entry(r.hotkey, r.block, r.kl, r.longctx) for r in current.results.values() if r.status == "ok"
        ]
        s = self.cfg.scoring
        current.win_rates = win_rates(entries, margin=s.margin, alpha=s.alpha) if entries else {}
        current.round_weights = softmax_weights(current.win_rates, s.temperature)
        alive = {n.hotkey for n in metagraph.neurons}
        self.state.moving_average = update_moving_average(
            self.state.moving_average, current.round_weights, alive, s.ema
        )
        current.scored = True
        self.save()
        for hotkey in alive:
            self.g_weight.labels(hotkey=hotkey).set(self.state.moving_average.get(hotkey, 0.0))

    def weights_by_uid(self) -> dict[int, float]:
        metagraph = self.chain.metagraph()
        out = {}
        for hotkey, value in self.state.moving_average.items():
            uid = metagraph.uid_of(hotkey)
            if uid is not None and value > 0:
                out[uid] = value
        return out

    def set_weights(self) -> None:
        """Set the moving average as weights for the round (a refusal is recorded and retried)."""
        current = self.state.current or self.state.last
        if current is None or current.weights_block is not None:
            return
        weights = self.weights_by_uid()
        if not weights:
            log.warning("round %d: no submission earned a weight; nothing to set", current.number)
            current.weights_error = "no weights to set"
        else:
            try:
                current.weights_block = self.chain.set_weights(weights)
                current.weights_error = ""
                self.c_weights.labels(outcome="ok").inc()
                log.info(
                    "round %d: weights set at block %d: %s",
                    current.number,
                    current.weights_block,
                    ", ".join(f"uid {u}: {w:.4g}" for u, w in sorted(weights.items())),
                )
            except RateLimited as e:
                current.weights_error = str(e)
                self.c_weights.labels(outcome="rate_limited").inc()
                log.info(
                    "round %d: weights rate limited (%d blocks left); will retry",
                    current.number,
                    e.blocks_left,
                )
            except ChainUnavailable:
                raise
            except ChainError as e:
                current.weights_error = str(e)
                self.c_weights.labels(outcome="error").inc()
                log.error("round %d: set_weights refused: %s", current.number, e)
        self.save()

    def retry_weights(self) -> None:
        last = self.state.last
        if (
            last is not None
            and last.scored
            and last.weights_block is None
            and last.weights_error != "no weights to set"
        ):
            self.set_weights()

    def finish_round(self, seconds: float) -> None:
        current = self.state.current
        assert current is not None
        self.state.last = current
        self.state.current = None
        self.state.rounds_completed += 1
        self._prune(current)
        self.save()
        self.health.beat("round done", round=current.number, block=current.block)
        summary = ", ".join(
            f"{r.hotkey}={r.status}" + (f"(kl {r.mean_kl:.3f})" if r.mean_kl is not None else "")
            for r in current.results.values()
        )
        log.info("round %d done in %.0fs: %s", current.number, seconds, summary or "no submissions")

    def _prune(self, current: RoundState) -> None:
        """Drop downloads no current commitment points at, old round files and excess origins."""
        keep = set()
        for r in current.results.values():
            with contextlib.suppress(CommitmentError):
                c = parse(r.data)
                keep.add(f"{c.repo.replace('/', '--')}@{c.revision}")
        downloads = self.dir / "downloads"
        if downloads.is_dir():
            for path in downloads.iterdir():
                if path.name not in keep:
                    shutil.rmtree(path, ignore_errors=True)
        rounds = self.dir / "rounds"
        if rounds.is_dir():
            for path in sorted(rounds.iterdir())[:-2]:
                shutil.rmtree(path, ignore_errors=True)
        live = {f"{r.hotkey}|{r.data}" for r in current.results.values()}
        self.state.verdicts = {k: v for k, v in self.state.verdicts.items() if k in live}
        if len(self.state.origins) > MAX_ORIGINS:
            ordered = sorted(self.state.origins.items(), key=lambda kv: kv[1].block)
            self.state.origins = dict(ordered[-MAX_ORIGINS:])
