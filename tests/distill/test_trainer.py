"""The trainer: distillation works, runs resume exactly after SIGKILL, ranks stay identical, DroPE switch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.cli import main
from quasar.checkpoint import load_checkpoint, read_checkpoint_config

REPO = Path(__file__).resolve().parents[2]


def train_args(workspace: Path, cache_dir: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        "--cache_dir", str(cache_dir),
        "--data.tokenizer", str(workspace / "tokenizer"),
        "--data.sample_len", "64",
        "--data.seq_len", "128",
        "--data.eval_samples", "24",
        "--optim.lr", "3e-3",
        "--optim.warmup_steps", "5",
        "--steps", str(steps),
        "--out_dir", str(out),
        "--no-progress",
        *extra,
    ]  # fmt: skip


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_distillation_halves_heldout_kl(workspace, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(workspace, cache_dir, out, 150, "--eval_every", "50", "--save_every", "150")) == 0
    evals = [m["eval_kl"] for m in read_metrics(out) if "eval_kl" in m]
    assert len(evals) == 4  # steps 0, 50, 100, 150
    assert evals[-1] <= 0.5 * evals[0], f"held-out KL went {evals[0]:.4f} -> {evals[-1]:.4f}"
    # The final checkpoint is a loadable Quasar model with the tokenizer beside it.
    ckpt = out / "checkpoints" / "step-00000150"
    assert (ckpt / "tokenizer.json").exists()
    model = load_checkpoint(ckpt)
    assert model.config.vocab_size == 512


def test_sigkill_resume_follows_the_same_loss_curve(workspace, cache_dir, tmp_path):
    steps = 14
    common = ["--save_every", "4", "--eval_every", "7", "--optim.grad_accum", "2"]
    straight = tmp_path / "straight"
    assert main(train_args(workspace, cache_dir, straight, steps, *common)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distill", *train_args(workspace, cache_dir, killed, steps, *common)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == "step-00000008":
            break
        time.sleep(0.02)
    assert proc.poll() is None, (
        "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before_kill = [m["step"] for m in read_metrics(killed)]
    assert max(done_before_kill) < steps

    assert main(train_args(workspace, cache_dir, killed, steps, *common)) == 0  # resumes from step 8
    a, b = read_metrics(straight), read_metrics(killed)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in ("loss", "kd", "eval_kl", "position"):
            assert x.get(key) == y.get(key), (x["step"], key, x.get(key), y.get(key))
    final_a = load_checkpoint(straight / "checkpoints" / f"step-{steps:08d}").state_dict()
    final_b = load_checkpoint(killed / "checkpoints" / f"step-{steps:08d}").state_dict()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from distill.cli import main as cli_main
import distill.trainer as trainer
result_holder = {}
original = trainer.train
def capture(*a, **k):
    result_holder["r"] = r = original(*a, **k)
    return r
trainer.train = capture
assert cli_main(sys.argv[1:]) == 0
student = result_holder["r"].student
torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, sys.argv[sys.argv.index("--out_dir") + 1] + f"/rank{dist.get_rank() if dist.is_initialized() else 0}.pt")
"""


def test_ddp_two_gloo_ranks_match_each_other_and_one_process(workspace, cache_dir, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ddp_out = tmp_path / "ddp"
    ddp_out.mkdir()
    args = train_args(workspace, cache_dir, ddp_out, 6, "--save_every", "6", "--data.eval_samples", "0")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = torch.load(ddp_out / "rank0.pt"), torch.load(ddp_out / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ in {name}"
    bias = rank0["model.router_balance.bias"]
    assert bias.abs().sum() > 0, "the SMEBU bias never moved"

    # Two ranks with one micro-batch each == one process with two micro-batches (same batches, same
    # averaged gradient, the same router token counts).
    single_out = tmp_path / "single"
    single_out.mkdir()
    args = train_args(
        workspace,
        cache_dir,
        single_out,
        6,
        "--save_every",
        "6",
        "--data.eval_samples",
        "0",
        "--optim.grad_accum",
        "2",
    )
    run = subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    single = torch.load(single_out / "rank0.pt")
    for name in rank0:
        torch.testing.assert_close(rank0[name], single[name], atol=2e-5, rtol=1e-4, msg=name)

    # FSDP2 (what the 3b-a1b preset uses) trains the same model; its checkpoint gathers full weights.
    fsdp_out = tmp_path / "fsdp"
    fsdp_out.mkdir()
    args = train_args(
        workspace, cache_dir, fsdp_out, 6, "--save_every", "6", "--data.eval_samples", "0", "--fsdp", "on"
    )
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "distill", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    fsdp = load_checkpoint(fsdp_out / "checkpoints" / "step-00000006").state_dict()
    for name in rank0:
        torch.testing.assert_close(fsdp[name], rank0[name], atol=2e-5, rtol=1e-4, msg=name)


def test_drope_stage_switch_from_a_rope_checkpoint(workspace, cache_dir, tmp_path):
    rope_run = tmp_path / "rope"
    assert main(train_args(workspace, cache_dir, rope_run, 4, "--save_every", "4")) == 0
    rope_ckpt = rope_run / "checkpoints" / "step-00000004"
    assert read_checkpoint_config(rope_ckpt).position_mode == "rope"

    drope_run = tmp_path / "drope"
    extra = ["--student.init_from", str(rope_ckpt), "--student.position_mode", "none", "--save_every", "6"]
    assert main(train_args(workspace, cache_dir, drope_run, 6, *extra)) == 0
    config = read_checkpoint_config(drope_run / "checkpoints" / "step-00000006")
    assert config.position_mode == "none"
    # Step 0 of the new stage evaluates the RoPE weights without RoPE: worse than with it.
    rope_final = [m for m in read_metrics(rope_run) if "eval_kl" in m][-1]["eval_kl"]
    drope_evals = [m["eval_kl"] for m in read_metrics(drope_run) if "eval_kl" in m]
    assert drope_evals[0] != pytest.approx(rope_final, rel=1e-6)
    assert drope_evals[-1] < drope_evals[0]


def test_cli_rejects_bad_settings_with_a_clear_message(workspace, cache_dir, tmp_path, capsys):
    code = main(train_args(workspace, cache_dir, tmp_path / "x", 3, "--loss.temperature", "-1"))
    assert code == 2
    err = capsys.readouterr().err
    assert "--loss.temperature" in err and "greater than 0" in err
    code = main(["train", "--steps", "3", "--out_dir", str(tmp_path / "y")])
    assert code == 2
    assert "logit cache" in capsys.readouterr().err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim: {lr: 3e-4, typo_field: 1}\n")
    code = main([*train_args(workspace, cache_dir, tmp_path / "z", 3), "--config", str(bad_yaml)])
    assert code == 2
    assert "optim.typo_field" in capsys.readouterr().err


def test_yaml_config_with_flag_overrides(workspace, cache_dir, tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text(
        f"cache_dir: {cache_dir}\nsteps: 50\nout_dir: {tmp_path / 'run'}\n"
        f"data: {{tokenizer: {workspace / 'tokenizer'}, sample_len: 64, seq_len: 128, eval_samples: 0}}\n"
        "optim: {lr: 1.0e-3, warmup_steps: 1}\nprogress: false\n"
    )
    assert main(["train", "--config", str(settings), "--steps", "2", "--optim.lr", "2e-3"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["steps"] == 2 and saved["optim"]["lr"] == 2e-3 and saved["optim"]["warmup_steps"] == 1


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--teacher.kind",
        "--loss.kind",
        "--optim.grad_accum",
        "--student.position_mode",
        "--fsdp",
        "--config",
    ):
        assert flag in text


def test_live_teacher_training_writes_through_to_the_cache(workspace, tmp_path):
    from distill.cache import LogitCache

    out, cache_root = tmp_path / "live", tmp_path / "cache"
    args = [
        "train",
        "--teacher.kind", "hf",
        "--teacher.model", str(workspace / "teacher"),
        "--teacher.device", "cpu",
        "--cache_dir", str(cache_root),
        "--k", "16",
        "--data.tokenizer", str(workspace / "tokenizer"),
        "--data.sources", str(workspace / "text"),
        "--data.sample_len", "64",
        "--data.seq_len", "128",
        "--data.eval_samples", "4",
        "--steps", "3",
        "--out_dir", str(out),
        "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    (cache_dir,) = [p.parent for p in cache_root.glob("*/manifest.json")]
    cache = LogitCache(cache_dir)
    assert cache.k == 16
    stored = cache.stats().samples
    assert 3 <= stored <= 3 * 4  # every trained sample (up to 4 per 128-token window) was written through


def test_fsdp_run_killed_and_resumed_follows_the_same_curve(workspace, cache_dir, tmp_path):
    """Two gloo ranks under FSDP2: SIGKILL the whole job after a checkpoint, restart, same curve
    (exercises the gathered optimizer state being scattered back into the shards)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        args = train_args(
            workspace, cache_dir, out, 8, "--save_every", "4", "--eval_every", "4", "--fsdp", "on"
        )
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "distill",
            *args,
        ]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = subprocess.run(command(straight), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == "step-00000004":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = read_metrics(straight), read_metrics(killed)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in ("loss", "eval_kl", "position"):
            assert (key in x) == (key in y), (x["step"], key)
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints" / f"step-{step:08d}").state_dict()


def _same_run(a: Path, b: Path, step: int) -> None:
    strip = ("tokens_per_s", "data_wait_s", "data_wait_fraction")
    ma = [{k: v for k, v in m.items() if k not in strip} for m in read_metrics(a)]
    mb = [{k: v for k, v in m.items() if k not in strip} for m in read_metrics(b)]
    assert ma == mb
    wa, wb = _weights(a, step), _weights(b, step)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("source", ["cache", "live"])
def test_prefetching_batches_changes_nothing_but_the_wait(workspace, cache_dir, tmp_path, source):
    if source == "cache":
        full = train_args(workspace, cache_dir, tmp_path / "x", 6)
        common = [*full[: full.index("--steps")], "--optim.grad_accum", "2"]
    else:
        common = [
            "train", "--teacher.kind", "hf", "--teacher.model", str(workspace / "teacher"),
            "--teacher.device", "cpu", "--k", "16", "--data.tokenizer", str(workspace / "tokenizer"),
            "--data.sources", str(workspace / "text"), "--data.sample_len", "64", "--data.seq_len", "128",
            "--data.eval_samples", "4",
        ]  # fmt: skip
    runs = {}
    for depth in (0, 3):
        out = tmp_path / f"{source}-prefetch{depth}"
        args = [
            *common,
            "--steps",
            "6",
            "--out_dir",
            str(out),
            "--no-progress",
            "--data.prefetch",
            str(depth),
        ]
        assert main([*args, "--save_every", "6", "--log_every", "1"]) == 0
        runs[depth] = out
    _same_run(runs[0], runs[3], 6)
    waits = [m["data_wait_fraction"] for m in read_metrics(runs[3]) if "data_wait_fraction" in m]
    assert len(waits) == 6 and all(w >= 0.0 for w in waits)  # recorded every step
