"""The validator's round: sync, read commitments, pre-check and download, find copies, score on
KL fidelity and long context, compare, fold into the moving average, set weights, persist.

A round is pinned to the block it started at: its block hash seeds the KL prompts and the
long-context samples, so every honest validator scores the same work and no miner can precompute
it. The state is saved after every submission, so a validator killed mid-round (SIGKILL
included) resumes the same round, with the same prompts, and never redoes or loses a score.
A bad submission (malformed, oversized, pickled, NaN-filled, wrongly shaped, slow, crashing,
hungry) gets a recorded reason and a zero; nothing a miner uploads can stop the round:

- every forward a submission runs (loading, fingerprint, KL, long context) happens in one worker
  process per submission (`validator_tasks.worker`) under the time budget and a memory cap, killed
  when either is spent; its configuration's cost per token is bounded before anything is loaded;
- the round's slots go to what can change the outcome (`neurons.planning`): garbage is free;
- a commitment may land before its weights are published (commit, then publish: no one can
  front-run weights they have not seen), and is retried until its grace runs out;
- copies earn nothing: the same content or fingerprint as an earlier submission, or outputs on the
  round's prompts that resemble an earlier one's without beating it (`neurons.scoring`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurons import node
from neurons.chain import ChainError, ChainUnavailable, CommitmentRecord, Metagraph, RateLimited
from neurons.commitment import Commitment, CommitmentError, parse
from neurons.config import ValidatorConfig
from neurons.planning import Candidate, priority
from neurons.scoring import (
    Entry,
    resemblance_copies,
    softmax_weights,
    update_moving_average,
    win_rates,
)
from neurons.state import (
    MAX_ATTEMPTS,
    Origin,
    RoundState,
    StateStore,
    SubmissionResult,
    ValidatorState,
)
from neurons.store import NotPublished, StoreError, StoreUnavailable
from neurons.verify import Submission, earliest_owner, verify_checkpoint
from validator_tasks.config import seed_from_block_hash
from validator_tasks.kl_eval import load_behaviour, load_prompts, save_prompts
from validator_tasks.models import BudgetExceeded

log = logging.getLogger(__name__)

MAX_ORIGINS = 4096  # checkpoints remembered for copy detection across rounds


@dataclass
class KLPrompts:
    """The round's prompts with the teacher's top-k on each, saved at `path` (a resumed round reuses
    them; the worker reads them from there)."""

    tokens: list[np.ndarray]
    topk: list  # distill.types.TopK per prompt
    path: Path


def text_windows(texts_sources: list[str], tokenizer, tokens: int, pool: int = 4096) -> list[list[int]]:
    """The first `pool` full windows of `tokens` tokens of the text."""
    from itertools import islice

    from distill.data import iter_samples, iter_texts

    windows = islice(iter_samples(iter_texts(texts_sources, "text"), tokenizer, tokens), pool)
    return [[int(t) for t in w] for w in windows if len(w) == tokens]


def select_prompts(
    texts_sources: list[str], tokenizer, seed: int, count: int, tokens: int, pool: int = 4096
) -> list[np.ndarray]:
    """`count` windows of `tokens` tokens drawn by `seed` from the first `pool` windows of the text."""
    windows = text_windows(texts_sources, tokenizer, tokens, pool)
    if len(windows) < count:
        raise ChainError(
            f"the KL prompt text holds {len(windows)} windows of {tokens} tokens, fewer than the "
            f"{count} prompts a round needs: give more text with --kl.sources or lower --kl.prompts"
        )
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(windows), size=count, replace=False)
    return [np.asarray(windows[i], dtype=np.int64) for i in sorted(picked)]


PROBE_WINDOWS, PROBE_TOKENS, PROBE_COLUMNS = 4, 32, 256


def select_probe(texts_sources: list[str], tokenizer, seed: int) -> tuple[list[list[int]], list[int]]:
    """The copy-detection probe: windows of real text and vocabulary columns among the tokens that
    occur in that text, both drawn by the validator's secret `seed` (a public probe of uniformly drawn
    ids let a copier re-draw exactly the embedding rows it reads and nothing real text uses)."""
    windows = text_windows(texts_sources, tokenizer, PROBE_TOKENS, pool=1024)
    if len(windows) < PROBE_WINDOWS:
        raise ChainError(
            f"the KL prompt text holds fewer than {PROBE_WINDOWS} windows: give more with --kl.sources"
        )
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(windows), size=PROBE_WINDOWS, replace=False))
    used = np.unique(np.concatenate([np.asarray(w) for w in windows]))
    columns = rng.choice(used, size=min(PROBE_COLUMNS, len(used)), replace=False)
    return [windows[i] for i in picked], sorted(int(c) for c in columns)


def _download_key(commitment: Commitment) -> str:
    return f"{commitment.repo.replace('/', '--')}@{commitment.revision}"


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
        self.memory_bytes = self._worker_memory_bytes()
        from validator_tasks.runner import SampleBank

        self.sample_bank = SampleBank()  # long-context samples, generated once per round and tokenizer
        self._bank_round: int | None = None
        self._probe: tuple[list[list[int]], list[int]] | None = None

    def _worker_memory_bytes(self) -> int:
        gb = self.cfg.scoring.worker_memory_gb
        if gb is not None:
            return int(gb * 2**30)
        import torch

        from quasar import QuasarForCausalLM

        with torch.device("meta"):
            params = QuasarForCausalLM(node.reference_config(self.cfg, len(self.tokenizer))).num_parameters()
        return int(3 * 4 * params + 4 * 2**30)

    @property
    def probe(self) -> tuple[list[list[int]], list[int]]:
        if self._probe is None:
            self._probe = select_probe(self.kl_sources, self.tokenizer, self.state.probe_seed)
        return self._probe

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
        if self._bank_round != current.number:  # samples of earlier rounds are never asked again
            self.sample_bank.samples.clear()
            self._bank_round = current.number
        if not current.scored:
            metagraph = self.chain.metagraph()
            commitments = self.chain.commitments()
            self.g_block.set(metagraph.block)
            if current.planned:
                log.info(
                    "resuming round %d: %d of %d judged",
                    current.number,
                    sum(h in current.results for h in current.planned),
                    len(current.planned),
                )
            else:
                self.plan_round(current, metagraph, commitments)
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
                self._record(current, result)
                self.health.beat("judging", round=current.number, hotkey=hotkey, status=result.status)
            self.score_round(current, metagraph)
        self.set_weights()
        self.finish_round(time.monotonic() - started)

    def _record(self, current: RoundState, result: SubmissionResult) -> None:
        current.results[result.hotkey] = result
        self.c_evaluated.labels(status=result.status).inc()
        if result.mean_kl is not None:
            self.g_kl.labels(hotkey=result.hotkey).set(result.mean_kl)
        if not (result.status == "pending" or (result.status == "error" and result.code == "DOWNLOAD")):
            self.state.judged[f"{result.hotkey}|{result.data}"] = current.number
        self.save()

    def plan_round(
        self, current: RoundState, metagraph: Metagraph, commitments: dict[str, CommitmentRecord]
    ) -> None:
        """Fill the round's slots (`neurons.planning`); what needs no slot is recorded at once."""
        blocks_now = metagraph.block
        candidates: dict[str, Candidate] = {}
        for record in sorted(commitments.values(), key=lambda r: (r.block, r.hotkey)):
            hotkey = record.hotkey
            uid = metagraph.uid_of(hotkey)
            if hotkey == self.chain.hotkey or uid is None:
                continue
            base = dict(hotkey=hotkey, uid=uid, block=record.block, data=record.data)
            key = f"{hotkey}|{record.data}"
            if key in self.state.verdicts:  # rejected before: held until the commitment changes
                current.results[hotkey] = self.state.verdicts[key].model_copy(
                    update={"uid": uid, "block": record.block}
                )
                continue
            problem = self._commitment_problem(record.data)
            if problem:
                result = SubmissionResult(**base, status="rejected", code="FORMAT", reason=problem)
                self.state.verdicts[key] = result
                current.results[hotkey] = result
                continue
            candidates[hotkey] = Candidate(
                hotkey, record.block, self.state.moving_average.get(hotkey, 0.0), self.state.judged.get(key)
            )
        slots = self.cfg.scoring.max_models
        planned: list[str] = []
        for hotkey in priority(list(candidates.values()), slots):
            if len(planned) >= slots:
                break
            record = commitments[hotkey]
            pending = self._not_published(record, metagraph.uid_of(hotkey), blocks_now)
            if pending is None:
                planned.append(hotkey)
            else:
                current.results[hotkey] = pending
                if pending.status == "rejected":
                    self.state.verdicts[f"{hotkey}|{record.data}"] = pending
        current.planned = planned
        current.queued = len(candidates) - len(planned) - sum(h in current.results for h in candidates)
        self.save()
        log.info(
            "round %d: %d commitments, %d to judge, %d answered without a slot, %d waiting for a slot",
            current.number,
            len(commitments),
            len(planned),
            len(current.results),
            current.queued,
        )

    def _commitment_problem(self, data: str) -> str:
        try:
            commitment = parse(data)
        except CommitmentError as e:
            return str(e)
        if commitment.store != self.cfg.store_kind:
            return (
                f"the commitment points at a {commitment.store} store; this subnet uses {self.cfg.store_kind}"
            )
        return ""

    def _not_published(
        self, record: CommitmentRecord, uid: int | None, block: int
    ) -> SubmissionResult | None:
        """None when the commitment's weights can be downloaded now; else a pending result (within the
        grace after the commitment) or a rejection (after it)."""
        commitment = parse(record.data)
        if (self.dir / "downloads" / _download_key(commitment)).is_dir():
            return None
        try:
            if self.store.available(commitment.repo, commitment.revision):
                return None
        except StoreUnavailable as e:
            return SubmissionResult(
                hotkey=record.hotkey, uid=uid or 0, block=record.block, data=record.data,
                status="error", code="DOWNLOAD", reason=str(e),
            )  # fmt: skip
        return self._unpublished(
            dict(hotkey=record.hotkey, uid=uid or 0, block=record.block, data=record.data), block
        )

    def _unpublished(self, base: dict, block: int) -> SubmissionResult:
        grace = self.cfg.scoring.publish_grace_blocks
        waited = block - base["block"]
        if waited <= grace:
            return SubmissionResult(
                **base, status="pending", code="UNPUBLISHED",
                reason=f"not downloadable yet, {waited} blocks after its commitment (retried for {grace} blocks)",
            )  # fmt: skip
        return SubmissionResult(
            **base, status="rejected", code="DOWNLOAD",
            reason=f"still not downloadable {waited} blocks after its commitment (the grace is {grace} blocks): "
            "publish the weights right after the commitment lands",
        )  # fmt: skip

    # -- one submission ------------------------------------------------------------------------------

    def round_prompts(self, current: RoundState) -> KLPrompts:
        path = self._round_dir(current.number) / "kl_prompts.npz"
        with contextlib.suppress(OSError, KeyError, ValueError):
            saved = load_prompts(path)
            if len(saved) == self.cfg.kl.prompts:
                return KLPrompts([t for t, _ in saved], [k for _, k in saved], path)
        tokens = select_prompts(
            self.kl_sources, self.tokenizer, current.seed, self.cfg.kl.prompts, self.cfg.kl.prompt_tokens
        )
        topk = self.teacher.topk([t.tolist() for t in tokens], self.cfg.kl.k)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_prompts(path, list(zip(tokens, topk, strict=True)))
        return KLPrompts(tokens, topk, path)

    def judge(
        self, current: RoundState, hotkey: str, uid: int, block: int, data: str, prompts: KLPrompts
    ) -> SubmissionResult:
        started = time.monotonic()
        deadline = started + self.cfg.scoring.time_budget_s
        base = dict(hotkey=hotkey, uid=uid, block=block, data=data)
        key = f"{hotkey}|{data}"
        if key in self.state.verdicts:  # judged before and rejected: held until the commitment changes
            return self.state.verdicts[key].model_copy(update={"uid": uid, "block": block})
        attempts = current.attempts.get(key, 0)
        if attempts >= MAX_ATTEMPTS:
            return SubmissionResult(
                **base, status="timeout", code="STALL",
                reason=f"the validator stopped {attempts} times while judging it (killed or crashed); "
                "skipped for the rest of this round",
            )  # fmt: skip
        current.attempts[key] = attempts + 1
        self.save()  # before any work: a validator that dies on this submission knows it on restart
        try:
            result = self._judge(current, base, deadline, prompts)
        except ChainUnavailable:
            raise
        except Exception as e:  # anything a submission provokes scores zero; the round goes on
            log.exception("%s: evaluation failed", hotkey)
            result = SubmissionResult(
                **base, status="error", code="EVAL_ERROR", reason=f"{type(e).__name__}: {e}"
            )
        current.attempts.pop(key, None)
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
        problem = self._commitment_problem(base["data"])
        if problem:
            return SubmissionResult(**base, status="rejected", code="FORMAT", reason=problem)
        commitment = parse(base["data"])
        dest = self.dir / "downloads" / _download_key(commitment)
        try:
            if not dest.exists():
                tmp = dest.with_name(dest.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                self.store.download(
                    commitment.repo, commitment.revision, tmp, max_bytes=self.competition.max_download_bytes
                )
                tmp.rename(dest)
        except NotPublished:  # committed before publishing, as it should be: retried within the grace
            return self._unpublished(base, self.chain.current_block())
        except StoreUnavailable as e:  # the store's fault, not the miner's: not cached, retried next round
            return SubmissionResult(**base, status="error", code="DOWNLOAD", reason=str(e))
        except StoreError as e:
            return SubmissionResult(**base, status="rejected", code="DOWNLOAD", reason=str(e))
        verdict = verify_checkpoint(dest, commitment, hotkey, self.competition, load=False)
        if not verdict.ok:
            return SubmissionResult(
                **base,
                status="rejected",
                code=verdict.code,
                reason=verdict.reason,
                content_hash=verdict.content_hash,
            )
        digest = verdict.content_hash
        assert digest is not None
        origin = self.state.origins.get(digest)
        if origin is None or (base["block"], hotkey) < (origin.block, origin.hotkey):
            # the earliest commitment seen owns the weights, whatever order they were judged in
            self.state.origins[digest] = Origin(hotkey=hotkey, block=base["block"])
        owned = dict(**base, content_hash=digest)
        owner = earliest_owner(Submission(hotkey, base["block"], digest), self._known_originals(False))
        if owner is not None:  # the same files: nothing to load
            return self._copy(owned, owner, "the same weights as")
        from validator_tasks.worker import IsolatedPredictor

        worker = IsolatedPredictor(
            str(dest),
            tokenizer=self.tokenizer_dir,
            device="cuda" if self.device.startswith("cuda") else "cpu",
            chunk=self.cfg.longctx.chunk,
            memory_bytes=self.memory_bytes,
        )
        with worker:
            _, failed = self._in_worker(owned, lambda: worker.start(deadline), "loading")
            if failed is not None:
                return failed
            prints = self.states.fingerprint(digest)
            if prints is None:  # deterministic for given content: computed once, kept on disk
                values, failed = self._in_worker(
                    owned, lambda: worker.fingerprint(*self.probe, deadline), "the fingerprint"
                )
                if failed is not None:
                    return failed
                prints = np.asarray(values, dtype=np.float64)
                self.states.save_fingerprint(digest, prints)
            owner = earliest_owner(Submission(hotkey, base["block"], digest, prints), self._known_originals())
            if owner is not None:
                return self._copy(owned, owner, "near-identical outputs on the copy-detection probe to")
            behaviour = self._behaviour_path(current, digest)
            kl_values, failed = self._in_worker(
                owned,
                lambda: worker.kl(
                    str(prompts.path), str(behaviour), score_from=self.cfg.kl.score_from, deadline=deadline
                ),
                "the KL evaluation",
            )
            if failed is not None:
                return failed
            kl = np.asarray(kl_values, dtype=np.float64)
            if not np.isfinite(kl).all():
                return SubmissionResult(
                    **owned, status="rejected", code="WEIGHTS",
                    reason="non-finite KL: the model's outputs are not finite",
                )  # fmt: skip
            if float(kl.mean()) > self.cfg.kl.max_kl:
                return SubmissionResult(
                    **owned, status="unfit", code="KL", kl=kl.tolist(),
                    reason=f"mean KL {kl.mean():.3f} above --kl.max_kl {self.cfg.kl.max_kl}: not a distilled student",
                )  # fmt: skip
            longctx, problem = self.longctx_scores(worker, current, deadline, name=hotkey)
        if problem:
            # not `"time" in problem`: "RuntimeError: ..." is an error, not a timeout
            timed_out = problem.startswith(("time budget", "long-context suite timeout"))
            return SubmissionResult(
                **owned, status="timeout" if timed_out else "error", code="LONGCTX", reason=problem,
                kl=kl.tolist(), longctx=longctx,
            )  # fmt: skip
        return SubmissionResult(**owned, status="ok", kl=kl.tolist(), longctx=longctx)

    def _in_worker(self, owned: dict, call, what: str) -> tuple[object, SubmissionResult | None]:
        """Run `call` (a request to the submission's worker): (its value, None) when it worked, else
        (None, the verdict its failure earns): the files are not a model (rejected), the memory cap (rejected), the time
        budget (timeout), anything else (error, judged afresh next round)."""
        from validator_tasks.worker import MemoryCapExceeded, ModelRejected, WorkerFailed

        budget = self.cfg.scoring.time_budget_s
        try:
            return call(), None
        except ModelRejected as e:
            reason = str(e).removeprefix("cannot load the model: ")
            return None, SubmissionResult(**owned, status="rejected", code="WEIGHTS", reason=reason)
        except MemoryCapExceeded as e:
            return None, SubmissionResult(**owned, status="rejected", code="MEMORY", reason=str(e))
        except BudgetExceeded:
            return None, SubmissionResult(
                **owned, status="timeout", code="SLOW",
                reason=f"{what} did not finish within the time budget of {budget:.0f}s; the model process was stopped",
            )  # fmt: skip
        except (WorkerFailed, RuntimeError) as e:
            return None, SubmissionResult(
                **owned, status="error", code="EVAL_ERROR", reason=f"{what} failed: {e}"
            )

    def _copy(self, owned: dict, owner: Submission, how: str) -> SubmissionResult:
        return SubmissionResult(
            **owned, status="copy", code="COPY", copy_of=owner.hotkey,
            reason=f"{how} {owner.hotkey}'s submission committed at block {owner.block}",
        )  # fmt: skip

    def _behaviour_path(self, current: RoundState, digest: str) -> Path:
        path = self._round_dir(current.number) / "behaviour" / f"{digest}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _known_originals(self, with_fingerprints: bool = True) -> list[Submission]:
        return [
            Submission(
                origin.hotkey, origin.block, h, self.states.fingerprint(h) if with_fingerprints else None
            )
            for h, origin in self.state.origins.items()
        ]

    def longctx_scores(
        self, worker, current: RoundState, deadline: float, *, name: str = "submission"
    ) -> tuple[list[float], str]:
        """Per-sample scores on the round's long-context samples (asked of the submission's worker,
        killed at the deadline), and a problem description ("" when the run went normally)."""
        if self.cfg.longctx.samples == 0:
            return [], ""
        from validator_tasks import runner
        from validator_tasks.config import EvalConfig

        remaining = deadline - time.monotonic()
        if remaining <= 1:
            return [], "time budget spent before the long-context suite"
        cfg = EvalConfig(
            model=["submission"],
            tokenizer=self.tokenizer_dir,
            tasks=self.cfg.longctx.tasks,
            lengths=self.cfg.longctx.lengths,
            samples=self.cfg.longctx.samples,
            block_hash=current.block_hash,
            time_budget=remaining,
            chunk=self.cfg.longctx.chunk,
            progress=False,
        )
        result = runner.evaluate(
            worker, self.tokenizer, cfg, name=name, deadline=deadline, bank=self.sample_bank
        )
        scores = [float(r.score) for r in result.samples]
        if result.status != "ok":
            return scores, f"long-context suite {result.status}: {result.message}"
        return scores, ""

    # -- scoring and weights ---------------------------------------------------------------------------

    def score_round(self, current: RoundState, metagraph: Metagraph) -> None:
        s = self.cfg.scoring
        self.mark_resemblance_copies(current)
        entries = [
            Entry(r.hotkey, r.block, r.kl, r.longctx) for r in current.results.values() if r.status == "ok"
        ]
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

    def mark_resemblance_copies(self, current: RoundState) -> None:
        """Turn into copies the submissions whose outputs on this round's prompts resemble an earlier
        original's without beating it by the margin (`neurons.scoring.resemblance_copies`)."""
        s = self.cfg.scoring
        ok = [r for r in current.results.values() if r.status == "ok"]
        behaviours = {}
        for r in ok:
            with contextlib.suppress(OSError, KeyError, ValueError):
                behaviours[r.hotkey] = load_behaviour(self._behaviour_path(current, r.content_hash or ""))
        entries = [Entry(r.hotkey, r.block, r.kl, r.longctx) for r in ok]
        copies = resemblance_copies(
            entries, behaviours, resemblance=s.resemblance, margin=s.margin, alpha=s.alpha
        )
        for hotkey, (owner, relative) in copies.items():
            r = current.results[hotkey]
            r.status, r.code, r.copy_of = "copy", "COPY", owner
            r.reason = (
                f"its outputs on this round's prompts are {relative:.3f}x its KL away from {owner}'s "
                f"(committed at block {current.results[owner].block}; resemblance below {s.resemblance}) "
                f"and it is not better than them by the {s.margin:.0%} margin"
            )
            self.c_evaluated.labels(status="copy").inc()
            log.warning("%s: a copy of %s (relative distance %.4f)", hotkey, owner, relative)

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
                keep.add(_download_key(parse(r.data)))
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
        # judged-round marks for the commitments still on chain (planned or not this round)
        on_chain = {f"{r.hotkey}|{r.data}" for r in self.chain.commitments().values()}
        self.state.judged = {k: v for k, v in self.state.judged.items() if k in on_chain}
        if len(self.state.origins) > MAX_ORIGINS:
            ordered = sorted(self.state.origins.items(), key=lambda kv: kv[1].block)
            self.state.origins = dict(ordered[-MAX_ORIGINS:])
