"""Distilling into an imported published checkpoint: `python -m quasar import-published`, then
`python -m distill train --student.init_from OUT` (the README's "start from the published base")."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.cli import main as distill_main
from distill.tiny import EOS_TOKEN, build_qwen3_teacher, local_corpus
from quasar.checkpoint import config_differences, load_checkpoint
from quasar.cli import main as quasar_main
from tests.fixtures import PUBLISHED_TINY

FIXTURE = PUBLISHED_TINY  # tests/fixtures: a copy of ../shared/fixtures


def small_tokenizer(texts: list[str], out: Path, vocab_size: int = 200):
    """A BPE tokenizer over the corpus' own characters, small enough for the fixture's 256 rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, "<unk>"], limit_alphabet=120, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token="<unk>"
    )
    fast.save_pretrained(str(out))
    return fast


def test_one_distillation_step_from_the_imported_base(tmp_path):
    base = tmp_path / "base"
    assert quasar_main(["import-published", str(FIXTURE), str(base), "--no-progress"]) == 0  # bf16, as for 3B
    texts = local_corpus()[:300]
    tokenizer = small_tokenizer(texts, tmp_path / "tokenizer")
    assert len(tokenizer) <= 256
    build_qwen3_teacher(tokenizer, tmp_path / "teacher", seed=0)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    out = tmp_path / "run"
    args = [
        "train",
        "--student.init_from", str(base),
        "--teacher.kind", "hf",
        "--teacher.model", str(tmp_path / "teacher"),
        "--teacher.device", "cpu",
        "--k", "8",
        "--data.tokenizer", str(tmp_path / "tokenizer"),
        "--data.sources", str(tmp_path / "text"),
        "--data.sample_len", "64",
        "--data.seq_len", "64",
        "--data.batch_size", "2",
        "--data.eval_samples", "2",
        "--steps", "1",
        "--save_every", "1",
        "--out_dir", str(out),
        "--no-progress",
    ]  # fmt: skip
    assert distill_main(args) == 0
    ckpt = out / "checkpoints" / "step-00000001"
    before, after = load_checkpoint(base, dtype=torch.float32), load_checkpoint(ckpt)
    assert config_differences(after.config, before.config) == []  # the published architecture, kept
    assert after.model.blocks[0].mixer.q_proj.weight.dtype == torch.float32  # fp32 master weights
    moved = [
        name
        for name, p in after.state_dict().items()
        if not torch.equal(p, before.state_dict()[name].to(p.dtype))
    ]
    assert "model.blocks.0.mixer.q_proj.weight" in moved and "lm_head.weight" in moved
    assert "model.router_balance.bias" in moved  # the SMEBU update ran after the step
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and m["loss"] > 0 for m in metrics)


def test_a_tokenizer_larger_than_the_imported_vocabulary_is_refused(tmp_path, workspace, capsys):
    base = tmp_path / "base"
    assert quasar_main(["import-published", str(FIXTURE), str(base), "--no-progress"]) == 0
    code = distill_main(
        [
            "train",
            "--student.init_from", str(base),
            "--teacher.kind", "hf",
            "--teacher.model", str(workspace / "teacher"),
            "--teacher.device", "cpu",
            "--data.tokenizer", str(workspace / "tokenizer"),  # 512 tokens
            "--data.sources", str(workspace / "text"),
            "--steps", "1",
            "--out_dir", str(tmp_path / "run"),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 2
    assert (
        "the tokenizer has 512 tokens but the checkpoint's vocabulary has 256 rows" in capsys.readouterr().err
    )


def test_published_format_as_init_from_names_the_importer(tmp_path, workspace, capsys):
    code = distill_main(
        [
            "train",
            "--student.init_from", str(FIXTURE),
            "--teacher.kind", "hf",
            "--teacher.model", str(workspace / "teacher"),
            "--data.tokenizer", str(workspace / "tokenizer"),
            "--data.sources", str(workspace / "text"),
            "--steps", "1",
            "--out_dir", str(tmp_path / "run"),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code != 0
    assert "import-published" in capsys.readouterr().err
