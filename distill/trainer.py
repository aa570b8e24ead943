"""The distillation trainer: one explicit loop, single process or `torchrun` (DDP, or FSDP2).

    for step:
        for micro-batch of this rank:      packed windows [1, batch_size * seq_len] + cu_seqlens
            hidden = student(input_ids, cu_seqlens)
            loss = KD(hidden, lm_head, teacher top-k)   chunked over positions, fp32
            backward (gradient sync only on the last micro-batch)
        clip, AdamW step, warmup + cosine schedule
        SMEBU: router token counts summed over micro-batches and ranks -> one bias update, same on every rank
        log (metrics.jsonl, progress bar, wandb); evaluate held-out KL; checkpoint atomically

A checkpoint holds the model (safetensors + config), optimizer, scheduler, step, data position
and every RNG; a run killed at any moment restarts from the latest one and follows the same loss
curve as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distill.cliconfig import ConfigError
from distill.config import TrainConfig
from distill.data import pack_windows
from distill.losses import LossConfig, distillation_loss, per_position_kl
from distill.sources import Prefetcher, SampleStream, StepData, build_batch, step_batches, take_samples
from distill.types import KDTargets
from quasar import QuasarConfig, QuasarForCausalLM
from quasar.checkpoint import load_checkpoint, save_checkpoint
from quasar.files import atomic_write, fsync_dir

log = logging.getLogger("distill.trainer")

STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"


# ------------------------------------------------------------------------------------------------
# Processes and devices
# ------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_kind: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and d.active:
        name = f"cuda:{d.local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        torch.cuda.set_device(device)
    return device


# ------------------------------------------------------------------------------------------------
# Student and the module DDP/FSDP wrap
# ------------------------------------------------------------------------------------------------


def prefetch_depth(configured: int | None, device: torch.device) -> int:
    """Steps of batches built ahead: as configured, else 2 on a GPU and 0 on CPU. On CPU the step's own
    threads use every core, and a producer thread beside them slowed the tiny preset's steps by half
    on 2 cores (bench/trainer_input.py) where waiting for data cost 5% of the step."""
    if configured is not None:
        return configured
    return 2 if device.type != "cpu" else 0


def build_student(cfg: TrainConfig, vocab_size: int | None) -> QuasarForCausalLM:
    s = cfg.student
    if s.init_from:
        # fp32 master weights whatever the checkpoint's dtype (an imported base is bf16); autocast
        # runs the compute in bf16 on GPUs.
        model = load_checkpoint(s.init_from, dtype=torch.float32)
        if vocab_size is not None and vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"--student.init_from {s.init_from}: the tokenizer has {vocab_size:,} tokens but the checkpoint's "
                f"vocabulary has {model.config.vocab_size:,} rows; use the tokenizer the checkpoint was made for"
            )
        model.config.attention_backend = s.attention_backend
        for block in model.model.blocks:
            block.mixer.backend = s.attention_backend
    else:
        overrides = {"attention_backend": s.attention_backend, **s.overrides}
        torch.manual_seed(cfg.seed)
        if vocab_size is not None:  # the preset's rows, grown to hold the tokenizer
            config = QuasarConfig.for_tokenizer(s.preset, vocab_size, **overrides)
        else:
            config = QuasarConfig.from_preset(s.preset, **overrides)
        model = QuasarForCausalLM(config)
    if s.position_mode is not None:
        # DroPE: the weights stay, RoPE is dropped (or restored); the saved config records the mode.
        model.config.position_mode = s.position_mode
    return model


class DistillStep(nn.Module):
    """student forward + KD loss as one module, so DDP/FSDP see the whole step (lm_head included)."""

    def __init__(self, student: QuasarForCausalLM, loss: LossConfig):
        super().__init__()
        self.student, self.loss_config = student, loss

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        targets: KDTargets,
        per_position: bool = False,
    ):
        """The training loss, or (per_position=True, for evaluation) the per-position KL [N].
        Evaluation goes through this forward too, so a sharded (FSDP) student gathers its weights."""
        hidden = self.student.model(
            input_ids=input_ids, cu_seqlens=cu_seqlens, use_cache=False
        ).last_hidden_state
        if per_position:
            return per_position_kl(hidden[0], self.student.lm_head.weight, targets)
        return distillation_loss(hidden[0], self.student.lm_head.weight, targets, self.loss_config)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to min_ratio at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    # Plain tensors, tuples and ints only, so the state loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "checkpoints" / LATEST_FILE
    if not pointer.exists():
        return None
    path = out_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise RuntimeError(
            f"{pointer} points at {path}, which is not a complete checkpoint; remove the pointer"
        )
    return path


def save_training_checkpoint(
    out_dir: Path,
    step: int,
    student: QuasarForCausalLM,
    state: dict[str, Any],
    keep: int,
    tokenizer_dir: str | None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """step-N/{config.json, model.safetensors, trainer_state.pt}: written into a temporary
    directory, fsynced, renamed, then the `latest` pointer is replaced atomically."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(student, tmp, state_dict=model_state)
    if tokenizer_dir:
        _copy_tokenizer(Path(tokenizer_dir), tmp)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(root / LATEST_FILE, final.name + "\n")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl (one JSON object per line); on resume, lines after the checkpoint's step are
    dropped so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, enabled: bool, wandb_run=None):
        self.path, self.enabled, self.wandb = path, enabled, wandb_run
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists() and resume_step > 0:
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a kill
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def _all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def evaluate_kl(step_module: nn.Module, student: QuasarForCausalLM, batches: list, device, autocast) -> float:
    """Mean per-position KL(teacher || student) (tail-bucket form, T = 1) over held-out batches."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast():
            kl = step_module(batch.input_ids, batch.cu_seqlens, batch.targets, per_position=True)
        mask = batch.targets.mask
        total += float(kl[mask].double().sum())
        count += int(mask.sum())
    student.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    final_checkpoint: Path | None
    metrics_path: Path
    last_eval_kl: float | None
    student: QuasarForCausalLM


def train(
    cfg: TrainConfig,
    stream: SampleStream,
    *,
    eval_stream: SampleStream | None = None,
    vocab_size: int | None = None,
    pad_id: int = 0,
) -> TrainResult:
    """Run (or resume) a distillation run described by `cfg` on samples from `stream`; the held-out
    KL is measured on the first `data.eval_samples` samples of `eval_stream` (which must not overlap
    the training samples: see `distill.cli.open_streams`)."""
    device_kind = (
        "cuda"
        if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device.startswith("cuda")
        else "cpu"
    )
    d = init_distributed(device_kind)
    device = resolve_device(cfg.device, d)
    use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")

    def autocast():
        if use_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    out_dir = Path(cfg.out_dir)
    resume_from = latest_checkpoint(out_dir) if cfg.resume else None

    student = build_student(cfg, vocab_size)
    if resume_from is not None:
        student.load_state_dict(load_checkpoint(resume_from).state_dict())
    student.to(device).train()
    if cfg.activation_checkpointing:
        student.model.gradient_checkpointing = True
    step_module: nn.Module = DistillStep(student, cfg.loss)

    use_fsdp = d.active and (cfg.fsdp == "on" or (cfg.fsdp == "auto" and cfg.student.preset == "3b-a1b"))
    if use_fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in student.model.blocks:
            fully_shard(block)
        fully_shard(step_module)
    elif d.active:
        step_module = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # router biases are updated identically on every rank
        )

    optimizer = torch.optim.AdamW(
        _param_groups(student, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(
            s, cfg.optim.warmup_steps, cfg.schedule_steps or cfg.steps, cfg.optim.min_lr_ratio
        ),
    )

    eval_count = cfg.data.eval_samples if eval_stream is not None else 0
    step, position = 0, 0
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=True)
        if state["world"] != d.world:
            raise RuntimeError(
                f"{resume_from} was written by {state['world']} processes, this run has {d.world}: "
                "resume with the same number of processes"
            )
        if use_fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                student, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, position = state["step"], state["position"]
        _set_rng_state(state["rng"][d.rank])
        if d.main:
            log.info("resumed from %s at step %d (sample %d)", resume_from, step, position)
    else:
        torch.manual_seed(cfg.seed + d.rank)

    eval_batches = []
    if eval_count:  # one window per batch, packed like training
        held_out = take_samples(eval_stream, eval_count)
        eval_batches = [
            build_batch(eval_stream, [window], cfg.data.seq_len, pad_id)
            for window in pack_windows(held_out, cfg.data.seq_len)
        ]

    wandb_run = None
    if cfg.wandb_project and d.main:
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError("--wandb_project needs the wandb package: pip install wandb") from e
        wandb_run = wandb.init(project=cfg.wandb_project, config=cfg.model_dump(), resume="allow")
    metrics = MetricsLog(out_dir / "metrics.jsonl", step, d.main, wandb_run)
    if d.main:
        (out_dir).mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))

    progress = None
    if d.main and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=step, desc="distill", unit="step", dynamic_ncols=True)

    last_eval = None
    if step == 0 and eval_batches:
        last_eval = evaluate_kl(step_module, student, eval_batches, device, autocast)
        metrics.write({"step": 0, "eval_kl": last_eval})

    # batches are built ahead of the step (cache decoding, live teacher, KDTargets) in the same order
    data = Prefetcher(
        step_batches(
            stream,
            seq_len=cfg.data.seq_len,
            batch_size=cfg.data.batch_size,
            grad_accum=cfg.optim.grad_accum,
            start=position,
            rank=d.rank,
            world=d.world,
            pad_id=pad_id,
        ),
        prefetch_depth(cfg.data.prefetch, device),
        name="distill-prefetch",
    )
    final_checkpoint = None
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            step_data: StepData = next(data)
            waited = data.waited
            totals = torch.zeros(4, dtype=torch.float64)  # loss*n, kd*n, ce*n, n (target positions)
            for i, batch in enumerate(step_data.batches):
                batch = batch.to(device)
                sync = i == len(step_data.batches) - 1
                no_sync = (
                    step_module.no_sync()
                    if (isinstance(step_module, nn.parallel.DistributedDataParallel) and not sync)
                    else contextlib.nullcontext()
                )
                with no_sync:
                    with autocast():
                        out = step_module(batch.input_ids, batch.cu_seqlens, batch.targets)
                    (out.loss / len(step_data.batches)).backward()
                n = float(out.positions)
                totals += torch.tensor(
                    [out.loss.item() * n, out.kd.item() * n, out.ce.item() * n, n], dtype=torch.float64
                )
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
                if cfg.optim.grad_clip > 0
                else torch.tensor(float("nan"))
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            counts = student.pop_router_token_counts()
            if counts is not None:
                counts = _all_reduce_sum(counts.to(torch.float32), d)
                student.update_router_bias(counts)
            step += 1
            position = step_data.position
            totals = _all_reduce_sum(totals.to(device), d).cpu()
            elapsed = time.perf_counter() - t0
            n = max(float(totals[3]), 1.0)
            record = {
                "step": step,
                "loss": float(totals[0]) / n,
                "kd": float(totals[1]) / n,
                "ce": float(totals[2]) / n,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "target_tokens": int(totals[3]),
                "tokens_per_s": float(totals[3]) / elapsed,
                "data_wait_s": waited,  # time this step waited for its batch
                "data_wait_fraction": waited / elapsed if elapsed > 0 else 0.0,
                "position": position,
            }
            if (step % cfg.eval_every == 0 or step == cfg.steps) and eval_batches:
                last_eval = evaluate_kl(step_module, student, eval_batches, device, autocast)
                record["eval_kl"] = last_eval
            if step % cfg.log_every == 0 or "eval_kl" in record or step == cfg.steps:
                metrics.write(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                final_checkpoint = _checkpoint(
                    cfg, out_dir, step, position, student, optimizer, scheduler, d, use_fsdp
                )
    finally:
        data.close()  # the producer stops before the stream's teacher and cache writer close
    if progress is not None:
        progress.close()
    metrics.close()
    if d.active:
        dist.barrier()
    return TrainResult(
        step, final_checkpoint or latest_checkpoint(out_dir), out_dir / "metrics.jsonl", last_eval, student
    )


def _checkpoint(
    cfg, out_dir, step, position, student, optimizer, scheduler, d: Dist, use_fsdp: bool
) -> Path | None:
    rngs = [_rng_state()]
    if d.active:
        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    model_state = optim_state = None
    if use_fsdp:  # gather full (unsharded) states: collectives, every rank takes part
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(student, options=options)
        optim_state = get_optimizer_state_dict(student, optimizer, options=options)
    path = None
    if d.main:
        state = {
            "step": step,
            "position": position,
            "world": d.world,
            "optimizer": optim_state if use_fsdp else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "config": cfg.model_dump(),
        }
        path = save_training_checkpoint(
            out_dir, step, student, state, cfg.keep_checkpoints, cfg.data.tokenizer, model_state
        )
    if d.active:
        dist.barrier()
    return path
