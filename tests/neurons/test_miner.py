"""The miner's publishing discipline: never commit what was not uploaded, never let anyone read the
weights before the commitment landed (stage, commit, publish), keep a pending checkpoint across
failed uploads, rate limits, failed publications and restarts, resume training where it stopped,
and publish only real improvements."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from neurons import node
from neurons.chain import EmbeddedChain
from neurons.commitment import parse
from neurons.config import MinerConfig
from neurons.miner_loop import Miner, MinerState, Publication
from neurons.store import LocalStore, StoreError, content_hash
from neurons.verify import verify_checkpoint
from quasar import QuasarConfig, QuasarForCausalLM
from quasar.checkpoint import save_checkpoint
from tests.neurons.devkit_cache import install_devkit


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("miner-root")
    install_devkit(path, tmp_path_factory)
    return path


def _cfg(root, wallet: str, **publish) -> MinerConfig:
    return MinerConfig.model_validate(
        {
            "root": str(root),
            "wallet": {"name": wallet},
            "device": "cpu",
            "max_rounds": 1,
            "telemetry": {"port": -1},
            "train": {"steps_per_round": 2, "eval_samples": 4, "batch_size": 2, "warmup_steps": 0},
            "publish": {"longctx_samples": 0, **publish},
        }
    )


def _miner(cfg: MinerConfig, **kwargs) -> Miner:
    return Miner(cfg, stopper=node.Stopper(threading.Event()), **kwargs)


class SpyStore(LocalStore):
    """The local store, counting (private) uploads; `fail` makes them raise as a Hub outage would,
    `fail_publish` makes publishing fail."""

    def __init__(self, root, fail: bool = False, fail_publish: bool = False):
        super().__init__(root)
        self.fail, self.fail_publish, self.uploads, self.published = fail, fail_publish, 0, []

    def stage(self, checkpoint, repo):
        self.uploads += 1
        if self.fail:
            raise StoreError(f"upload of {checkpoint} to {repo} failed: hub down")
        return super().stage(checkpoint, repo)

    def publish(self, repo, revision):
        if self.fail_publish:
            raise StoreError(f"cannot make {repo} public: hub down")
        super().publish(repo, revision)
        self.published.append((repo, revision))


def _saved_state(miner: Miner) -> MinerState:
    return MinerState.model_validate(json.loads(miner.state_path.read_text()))


def test_a_failed_upload_commits_nothing_and_a_restarted_miner_publishes_and_resumes(root, tmp_path) -> None:
    from distill.trainer import latest_checkpoint

    hotkey = "alice/default"
    failing = SpyStore(root / "store", fail=True)
    miner = _miner(_cfg(root, "alice"), store=failing)
    assert miner.run() == 1
    assert failing.uploads == 1
    pending = miner.state.pending
    assert pending is not None and pending.step == 2 and pending.revision is None and pending.data is None
    assert miner.state.committed is None and miner.state.history == []
    assert _saved_state(miner) == miner.state  # persisted as it is
    chain = EmbeddedChain(root / "chain.sqlite", 24)
    assert hotkey not in chain.commitments()
    assert not (root / "store" / "alice.default").exists()

    # restarted with a working store (and a bar the next round cannot clear): it publishes the
    # pending checkpoint first, then trains on from step 2
    working = SpyStore(root / "store")
    restarted = _miner(_cfg(root, "alice", min_improvement=0.99), store=working)
    assert restarted.state == miner.state
    assert restarted.run() == 1
    committed = restarted.state.committed
    assert committed is not None and committed.step == 2 and working.uploads == 1
    assert committed.kl == pending.kl and committed.content_hash == pending.content_hash
    record = chain.commitments()[hotkey]
    assert (record.data, record.block) == (committed.data, committed.block)
    assert restarted.state.pending is None and restarted.state.history == [committed]
    assert restarted.state.rounds == 2
    assert latest_checkpoint(restarted.run_dir).name == "step-00000004"  # steps continue

    # what was committed is what a validator accepts from this hotkey
    commitment = parse(committed.data)
    assert (commitment.store, commitment.repo) == ("local", "alice.default")
    fetched = LocalStore(root / "store").download(
        commitment.repo, commitment.revision, tmp_path / "fetched", max_bytes=10**8
    )
    competition = node.competition(restarted.cfg, len(restarted.tokenizer))
    verdict = verify_checkpoint(fetched, commitment, hotkey, competition)
    assert verdict.ok, verdict.reason

    # a third start keeps the committed record and has nothing left to publish
    third = _miner(_cfg(root, "alice"), store=working)
    assert third.state.committed == committed and third.state.pending is None
    third.publish_pending()
    assert working.uploads == 1 and chain.commitments()[hotkey] == record
    third.close()
    chain.close()


def _checkpoint(path, seed: int, vocab: int):
    torch.manual_seed(seed)
    save_checkpoint(QuasarForCausalLM(QuasarConfig.from_preset("tiny", vocab_size=vocab)), path)
    return Publication(step=seed * 10, checkpoint=str(path), content_hash=content_hash(path), kl=1.0 / seed)


def test_a_rate_limited_commitment_stays_pending_and_is_committed_later(root, tmp_path) -> None:
    hotkey = "rl/default"
    chain = EmbeddedChain(
        tmp_path / "chain.sqlite", 24, hotkey, seconds_per_block=3600, commitment_rate_limit=5
    )
    chain.register(hotkey, "rl-coldkey", 0.0)
    store = SpyStore(root / "store")
    miner = _miner(_cfg(root, "rl"), chain=chain, store=store)
    vocab = len(miner.tokenizer)

    miner.state.pending = _checkpoint(tmp_path / "one", 1, vocab)
    miner.publish_pending()
    first = miner.state.committed
    assert first is not None and first.step == 10 and first.block == chain.current_block()
    assert chain.commitments()[hotkey].data == first.data

    miner.state.pending = _checkpoint(tmp_path / "two", 2, vocab)
    miner.publish_pending()  # uploaded, but the chain refuses a second commitment this soon
    pending = miner.state.pending
    assert pending is not None and pending.revision is not None and pending.data is not None
    assert pending.block is None and miner.state.committed == first
    assert chain.commitments()[hotkey].data == first.data
    assert _saved_state(miner).pending == pending  # survives a crash
    assert store.uploads == 2

    # waiting for the limit is interrupted by a stop request, and nothing is lost
    miner.stopper.event.set()
    miner.publish_pending(wait=True)
    assert miner.state.pending == pending and chain.commitments()[hotkey].data == first.data

    # a restarted miner, once the limit has passed, commits it without uploading again
    miner.lock.close()  # as if the first one had been killed (its chain is shared: not closed)
    restarted = _miner(_cfg(root, "rl"), chain=chain, store=store)
    assert restarted.state.pending == pending
    restarted.publish_pending()
    assert restarted.state.pending == pending  # still limited: the clock did not move
    chain.advance(5)
    restarted.publish_pending()
    second = restarted.state.committed
    assert second is not None and second.step == 20 and second.data == pending.data
    assert second.block == chain.current_block() and chain.commitments()[hotkey].data == pending.data
    assert restarted.state.pending is None and [p.step for p in restarted.state.history] == [10, 20]
    assert _saved_state(restarted) == restarted.state
    assert store.uploads == 2
    restarted.close()


def test_weights_become_readable_only_after_their_commitment_landed(root, tmp_path) -> None:
    hotkey = "order/default"
    chain = EmbeddedChain(tmp_path / "chain.sqlite", 24, hotkey)
    chain.register(hotkey, "order-coldkey", 0.0)
    store = SpyStore(root / "store", fail_publish=True)
    miner = _miner(_cfg(root, "order"), chain=chain, store=store)
    seen_at_commit = []
    commit = chain.commit

    def watched_commit(data):
        c = parse(data)
        seen_at_commit.append(store.available(c.repo, c.revision))  # what a watcher could read
        return commit(data)

    chain.commit = watched_commit
    miner.state.pending = _checkpoint(tmp_path / "one", 1, len(miner.tokenizer))
    miner.publish_pending()
    committed = miner.state.committed
    assert seen_at_commit == [False] and committed is not None and committed.block is not None
    # the publication failed after the commitment: kept, and retried (without committing again)
    assert committed.published is False and _saved_state(miner).committed.published is False
    assert not store.available(committed.repo, committed.revision)
    store.fail_publish = False
    miner.publish_pending()
    assert store.published == [(committed.repo, committed.revision)] and miner.state.committed.published
    assert store.available(committed.repo, committed.revision) and len(seen_at_commit) == 1
    assert _saved_state(miner).history[-1].published
    miner.close()


@pytest.mark.parametrize(
    ("reference", "kl", "longctx", "publish"),
    [
        (None, 5.0, None, True),  # nothing published yet: anything goes
        ("committed", 0.995, None, False),  # 0.5% better: under the 1% bar
        ("committed", 0.985, None, True),  # 1.5% better
        ("committed", 1.2, 0.9, False),  # worse KL, whatever the long context
        ("committed", 0.9, 0.44, False),  # long context fell 0.06 > tolerance 0.05
        ("committed", 0.9, 0.46, True),  # fell 0.04: tolerated
        ("committed", 0.9, None, True),  # self-check off: KL decides
        ("pending", 0.85, 0.5, False),  # the pending checkpoint is the bar (0.8), not the committed
        ("pending", 0.78, 0.5, True),
    ],
)
def test_better_needs_a_kl_gain_without_losing_long_context(root, reference, kl, longctx, publish) -> None:
    miner = _miner(_cfg(root, "judge"))
    committed = Publication(step=2, checkpoint="c", content_hash="0" * 64, kl=1.0, longctx=0.5)
    if reference is not None:
        miner.state.committed = committed
    if reference == "pending":
        miner.state.pending = committed.model_copy(update={"step": 4, "kl": 0.8})
    candidate = Publication(step=6, checkpoint="x", content_hash="1" * 64, kl=kl, longctx=longctx)
    assert miner.better(candidate) is publish
    miner.close()
