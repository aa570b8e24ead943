"""The miner's round: distil for a while, evaluate itself, and publish and commit the checkpoint
when it is better than the last one committed.

- Training is `distill`'s trainer with a live teacher, extended round by round in one run
  directory (one learning-rate schedule, exact resume after any crash).
- The self-evaluation is the trainer's held-out KL plus a small `validator_tasks` suite run on
  the student in memory.
- A checkpoint is committed only when its KL beats the last committed one by
  `publish.min_improvement` without losing long-context accuracy, and published only after its
  commitment landed: stage (upload where no validator can read it yet: a private Hub repo, the local
  store's staging area) -> commit the pinned revision -> publish. Whoever sees the weights first
  sees a commitment already on chain, so no watcher can commit them before their author. The
  chain's commitment rate limit is respected: a commitment that has to wait stays pending
  (persisted) and is retried, never lost; so is a publication that failed.
- The miner's own state (`miner_state.json`) is written atomically after every change.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from neurons import node
from neurons.chain import ChainError, ChainUnavailable, RateLimited
from neurons.commitment import Commitment
from neurons.config import MinerConfig
from neurons.state import load_state_file, save_state_file
from neurons.store import StoreError, content_hash

log = logging.getLogger(__name__)

STATE_FORMAT = "q24-miner-state/1"


class Publication(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int
    checkpoint: str
    content_hash: str
    kl: float
    longctx: float | None = None
    repo: str | None = None
    revision: str | None = None  # set once staged (uploaded where validators cannot read it yet)
    data: str | None = None  # the commitment string
    block: int | None = None  # set once committed
    published: bool = True  # False from staging until the revision is made readable


class MinerState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = STATE_FORMAT
    netuid: int
    hotkey: str
    rounds: int = 0
    committed: Publication | None = None
    pending: Publication | None = None  # better than committed, upload or commitment not done yet
    history: list[Publication] = Field(default_factory=list)


class Miner(node.NodeBase):
    role = "miner"

    cfg: MinerConfig

    def setup(self) -> None:
        if self.cfg.store_kind == "hf" and self.cfg.publish.repo is None:
            raise ChainError("publishing to the Hub needs --publish.repo user/name")
        self.repo = self.cfg.publish.repo or node.local_repo_key(self.cfg)
        self.run_dir = self.dir / "run"
        self.state_path = self.dir / "miner_state.json"
        self.sources = self.text_sources(self.cfg.train.sources, "--train.sources")
        self.student = self.student_settings()  # at start-up: a base is imported before the first round
        self.state = self._load_state()
        m = self.metrics
        self.g_step = m.gauge("q24_miner_step", "optimizer steps trained")
        self.g_kl = m.gauge("q24_miner_heldout_kl", "held-out KL of the latest checkpoint")
        self.g_committed_kl = m.gauge("q24_miner_committed_kl", "held-out KL of the committed checkpoint")
        self.c_commits = m.counter("q24_miner_commits", "commitments written")
        self.c_uploads = m.counter("q24_miner_upload_failures", "uploads that failed")

    # -- state ---------------------------------------------------------------------------------------

    def _load_state(self) -> MinerState:
        state = load_state_file(
            self.state_path, MinerState, self.cfg.netuid, self.chain.hotkey, "miner state"
        )
        return state if state is not None else MinerState(netuid=self.cfg.netuid, hotkey=self.chain.hotkey)

    def save(self) -> None:
        save_state_file(self.state_path, self.state)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> int:
        done = 0
        try:
            while not self.stopper.stopped:
                try:
                    self.publish_pending()
                    if self.stopper.stopped:
                        break
                    self.run_round()
                    done += 1
                    if self.cfg.max_rounds is not None and done >= self.cfg.max_rounds:
                        self.publish_pending(wait=True)
                        break
                except ChainUnavailable as e:
                    log.warning("chain unavailable, retrying in 10 s: %s", e)
                    self.health.fail(str(e))
                    self.stopper.sleep(10)
        finally:
            self.close()
        return done

    def student_settings(self) -> dict:
        """A new run starts from the competition's base (imported once) or a fresh preset student."""
        reference = node.reference_config(self.cfg, len(self.tokenizer))  # also: the tokenizer fits the base
        if self.cfg.competition.base is not None:
            from neurons.competition_base import base_checkpoint

            return {"init_from": str(base_checkpoint(self.cfg))}
        return {"preset": self.cfg.competition.preset_name, "overrides": {"vocab_size": reference.vocab_size}}

    def train_config(self, steps: int):
        from distill.config import TrainConfig

        t = self.cfg.train
        data = {
            "out_dir": str(self.run_dir),
            "steps": steps,
            "schedule_steps": max(t.total_steps, steps),
            "k": t.k,
            "teacher": node.teacher_config(self.cfg, self.kit, self.device).model_dump(),
            "student": self.student,
            "data": {
                "sources": self.sources,
                "tokenizer": self.tokenizer_dir,
                "sample_len": t.sample_len,
                "seq_len": t.seq_len,
                "batch_size": t.batch_size,
                "eval_samples": t.eval_samples,
            },
            "optim": {"lr": t.lr, "warmup_steps": t.warmup_steps},
            "seed": t.seed,
            "device": self.device,
            "save_every": steps,
            "eval_every": steps,
            "log_every": 10,
            "progress": False,
        }
        for key, value in t.overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return TrainConfig.model_validate(data)

    def run_round(self) -> None:
        from distill.cli import run_train
        from distill.trainer import latest_checkpoint

        latest = latest_checkpoint(self.run_dir)
        done_steps = int(latest.name.split("-")[1]) if latest is not None else 0
        target = done_steps + self.cfg.train.steps_per_round
        self.health.beat("training", step=done_steps, target=target)
        started = time.monotonic()
        result = run_train(self.train_config(target))
        self.state.rounds += 1
        self.g_step.set(result.step)
        kl = result.last_eval_kl
        if kl is None or result.final_checkpoint is None:
            raise ChainError("the trainer produced no held-out KL or checkpoint; check --train.eval_samples")
        self.g_kl.set(kl)
        longctx = self.self_evaluate(result.student)
        log.info(
            "round %d: %d steps in %.0fs, held-out KL %.4f%s",
            self.state.rounds,
            result.step,
            time.monotonic() - started,
            kl,
            f", long-context accuracy {longctx:.3f}" if longctx is not None else "",
        )
        candidate = Publication(
            step=result.step,
            checkpoint=str(result.final_checkpoint),
            content_hash=content_hash(result.final_checkpoint),
            kl=kl,
            longctx=longctx,
        )
        if self.better(candidate):
            keep = self.dir / "publish" / f"step-{result.step:08d}"
            self._snapshot(result.final_checkpoint, keep)
            self.state.pending = candidate.model_copy(update={"checkpoint": str(keep)})
        self.save()
        self.health.beat("trained", step=result.step, kl=kl)

    def better(self, candidate: Publication) -> bool:
        reference = self.state.pending or self.state.committed
        if reference is None:
            return True
        p = self.cfg.publish
        kl_ok = candidate.kl <= reference.kl * (1 - p.min_improvement)
        lc_ok = (
            candidate.longctx is None
            or reference.longctx is None
            or candidate.longctx >= reference.longctx - p.longctx_tolerance
        )
        if not kl_ok:
            log.info(
                "not publishing: KL %.4f is not %.0f%% below %.4f",
                candidate.kl,
                100 * p.min_improvement,
                reference.kl,
            )
        elif not lc_ok:
            log.info(
                "not publishing: long-context accuracy fell from %.3f to %.3f",
                reference.longctx,
                candidate.longctx,
            )
        return kl_ok and lc_ok

    @staticmethod
    def _snapshot(checkpoint: Path, dest: Path) -> None:
        """The publishable files, kept apart from the trainer's rotating checkpoints."""
        import shutil

        from neurons.store import publishable_files

        if dest.exists():
            return
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in publishable_files(checkpoint):
            shutil.copy2(f, tmp / f.name)
        tmp.rename(dest)

    def self_evaluate(self, student) -> float | None:
        p = self.cfg.publish
        if p.longctx_samples == 0:
            return None
        from validator_tasks.config import EvalConfig
        from validator_tasks.models import StreamingPredictor
        from validator_tasks.runner import evaluate

        cfg = EvalConfig(
            model=["self"], tokenizer=self.tokenizer_dir, lengths=p.longctx_lengths,
            tasks="niah_single,variable_tracking", samples=p.longctx_samples, seed=0, progress=False,
            device="cuda" if self.device.startswith("cuda") else "cpu", isolate=False,
        )  # fmt: skip
        student.eval()
        predictor = StreamingPredictor(
            student, self.tokenizer, chunk=cfg.chunk, baseline_chunk=0, max_new_tokens=None
        )
        return float(evaluate(predictor, self.tokenizer, cfg, name="self").score)

    # -- publishing ----------------------------------------------------------------------------------

    def publish_pending(self, wait: bool = False) -> None:
        """Stage the pending checkpoint (if not yet), commit it (if the rate limit allows; with `wait`,
        sleep until it does), then publish it; and publish a committed checkpoint whose publication
        failed before."""
        pending = self.state.pending
        if pending is not None:
            if pending.revision is None:
                try:
                    revision = self.store.stage(pending.checkpoint, self.repo)
                except StoreError as e:
                    self.c_uploads.inc()
                    self.health.fail(str(e))
                    log.error("upload failed, not committing (retrying next round): %s", e)
                    return
                pending.repo, pending.revision, pending.published = self.repo, revision, False
                commitment = Commitment.for_checkpoint(
                    self.cfg.store_kind, self.repo, revision, pending.content_hash, self.chain.hotkey
                )
                pending.data = commitment.encode()
                self.save()
                log.info("staged step %d at %s@%s (not public yet)", pending.step, self.repo, revision[:12])
            if not self._commit(pending, wait):
                return
        self._publish_committed()

    def _commit(self, pending: Publication, wait: bool) -> bool:
        while True:
            try:
                block = self.chain.commit(pending.data)
                break
            except RateLimited as e:
                seconds = e.blocks_left * self.chain.limits().seconds_per_block
                if not wait:
                    log.info("commitment rate limited for %d more blocks; keeping it pending", e.blocks_left)
                    return False
                log.info("commitment rate limited; waiting %.0fs", seconds)
                if self.stopper.sleep(seconds + 0.5):
                    return False
        pending.block = block
        self.state.committed = pending
        self.state.history.append(pending)
        self.state.pending = None
        self.save()
        self.c_commits.inc()
        self.g_committed_kl.set(pending.kl)
        self.health.beat("committed", block=block, step=pending.step)
        log.info("committed step %d (KL %.4f) at block %d: %s", pending.step, pending.kl, block, pending.data)
        return True

    def _publish_committed(self) -> None:
        committed = self.state.committed
        if committed is None or committed.published or committed.repo is None or committed.revision is None:
            return
        try:
            self.store.publish(committed.repo, committed.revision)
        except StoreError as e:  # committed already: validators retry it within their grace
            self.c_uploads.inc()
            self.health.fail(str(e))
            log.error("publishing %s@%s failed (retrying): %s", committed.repo, committed.revision[:12], e)
            return
        committed.published = True
        for entry in self.state.history:
            if entry.revision == committed.revision:
                entry.published = True
        self.save()
        log.info("published %s@%s", committed.repo, committed.revision[:12])
