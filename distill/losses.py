"""Knowledge-distillation losses from teacher top-k log-probabilities, chunked over positions.

Every loss compares the teacher and the student over k + 1 buckets: the teacher's top-k ids (one
bucket each) and a tail bucket holding all other ids. With p the teacher's probabilities (tempered
and renormalised over the k ids plus the tail), q = softmax(z / T) the student's, r and t the two
tails (t = 1 - Q_K = the student's mass outside the k ids):

* ``forward_kl_tail`` (default): sum_K p log(p / q) + r log(r / t), with r and t clamped at eps
  inside the logs. A lower bound on the full-vocabulary KL (merging categories never raises KL),
  equal to it when the k ids cover the vocabulary and r = 0.
* ``topk_kl``: KL between p and q both renormalised over the k ids (blind to the student's tail).
* ``reverse_kl``: KL(q || p) over the k + 1 buckets (teacher tail clamped at eps inside the log).
* ``jsd``: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, over the buckets.

The total is ``ce_weight * CE + (1 - ce_weight) * T^2 * KD``: CE is next-token cross-entropy at
T = 1 averaged over positions whose label is not -100, KD is averaged over masked positions.

Memory: logits are built for ``chunk_size`` positions at a time from the hidden states and the
lm_head weight, never for all N positions (N x 248,320 fp32 logits would take gigabytes). A plain
autograd loop over chunks would still keep every chunk's logits alive for backward, so the loss and
its gradients are computed together in forward (closed forms, below) and backward only rescales
them: the saved state is one gradient the size of ``hidden`` plus an fp32 accumulator the size of
the weight. All probability math runs in fp32 (fp64 for fp64 inputs) whatever the hidden dtype.

Gradient used for every kind (derivation in one line): for a loss L of the bucket masses
b_j = sum_{i in j} q_i with q = softmax(u), u = z / T, and h_j = dL/d(log b_j),
dL/du_i = q_i (h_j / b_j - H) for i in bucket j, H = sum_j h_j. For a single-id bucket this is
h_i - q_i H; for the tail it is q_i (w - H) with w = h_tail / b_tail, which each kind computes
without dividing by a possibly-zero tail.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.autograd.function import once_differentiable

from distill.types import KDTargets

__all__ = [
    "LossConfig",
    "LossOutput",
    "distillation_loss",
    "per_position_kl",
    "per_position_kl_from_logits",
]

LossKind = Literal["forward_kl_tail", "topk_kl", "reverse_kl", "jsd"]
_NEG_INF = float("-inf")
_MATMUL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class LossConfig(BaseModel):
    """How the student is scored against the teacher's top-k predictions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: LossKind = Field(
        "forward_kl_tail",
        description="forward_kl_tail: KL(teacher || student) over the top-k ids plus one tail bucket "
        "(default); topk_kl: KL renormalised over the top-k ids; reverse_kl: KL(student || teacher) "
        "over the same buckets; jsd: generalised Jensen-Shannon divergence with weight jsd_beta",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="softening temperature T: teacher p^(1/T) renormalised, student softmax(z/T); "
        "the KD term is multiplied by T^2",
    )
    ce_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="weight of next-token cross-entropy (at T=1) in the total; KD gets 1 - ce_weight",
    )
    jsd_beta: float = Field(
        0.5, gt=0, lt=1, description="jsd only: mixture weight of the teacher, m = beta p + (1 - beta) q"
    )
    chunk_size: int = Field(
        1024,
        ge=1,
        description="positions whose full-vocabulary logits exist at once; memory is about "
        "3 x chunk_size x vocab x 4 bytes",
    )
    eps: float = Field(
        1e-6,
        gt=0,
        lt=1,
        description="floor for the teacher and student tail masses inside logarithms",
    )
    matmul_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the hidden x lm_head matmuls: float32 upcasts both first (float64 inputs "
        "stay float64); bfloat16/float16 multiply in that dtype (faster on GPU) and upcast the logits "
        "to fp32 before the softmax",
    )


@dataclass(frozen=True)
class LossOutput:
    """loss: the differentiable total. kd: mean KD over masked positions (before the T^2 factor).
    ce: mean next-token cross-entropy over labelled positions (computed even when ce_weight is 0).
    positions: number of masked (KD) positions."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    positions: int


@dataclass
class _Prepared:
    """Validated targets in the compute dtype, ready to slice by chunk."""

    ids: torch.Tensor  # [N, k] int64; empty slots point at a real id of the same row (or 0)
    valid: torch.Tensor  # [N, k] bool: slot holds a teacher id at a masked position
    has_ids: torch.Tensor  # [N] bool: row has at least one valid slot
    alpha_k: torch.Tensor  # [N, k] tempered, renormalised teacher log-probs; -inf where not valid
    alpha_t: torch.Tensor  # [N] same for the tail bucket
    kd_mask: torch.Tensor  # [N] bool
    labels: torch.Tensor  # [N] int64, -100 replaced by 0
    has_label: torch.Tensor  # [N] bool
    n_kd: int
    n_ce: int


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # fp32 at least; fp64 inputs (gradcheck) keep fp64.
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _check_shapes(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: KDTargets
) -> None:
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a floating [N, d] tensor, got {tuple(hidden.shape)} {hidden.dtype}; "
            "flatten batch and sequence first (hidden.reshape(-1, d))"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or not weight.is_floating_point():
        raise ValueError(
            f"lm_head_weight must be a floating [V, d] tensor with d = {hidden.shape[1]} (hidden's last "
            f"dim), got {tuple(weight.shape)} {weight.dtype}"
        )
    if weight.shape[0] == 0:
        raise ValueError("lm_head_weight has an empty vocabulary (V = 0)")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_floating_point()):
        raise ValueError(
            f"lm_head_bias must be a floating [V] = [{weight.shape[0]}] tensor, got {tuple(bias.shape)}"
        )
    n = hidden.shape[0]
    ids, lp = targets.token_ids, targets.logprobs
    if ids.dim() != 2 or lp.shape != ids.shape or ids.shape[0] != n:
        raise ValueError(
            f"targets.token_ids {tuple(ids.shape)} and targets.logprobs {tuple(lp.shape)} must both be "
            f"[N, k] with N = {n} (hidden's rows)"
        )
    for name in ("tail_logprob", "mask", "labels"):
        t = getattr(targets, name)
        if t.shape != (n,):
            raise ValueError(f"targets.{name} must be [N] = [{n}], got {tuple(t.shape)}")
    if ids.is_floating_point() or targets.labels.is_floating_point():
        raise ValueError("targets.token_ids and targets.labels must be integer tensors (int64)")
    if not lp.is_floating_point() or not targets.tail_logprob.is_floating_point():
        raise ValueError("targets.logprobs and targets.tail_logprob must be floating tensors (float32)")
    if targets.mask.dtype != torch.bool:
        raise ValueError(f"targets.mask must be bool, got {targets.mask.dtype}")
    devices = {hidden.device, weight.device, *(getattr(targets, f).device for f in KDTargets.FIELDS)}
    if bias is not None:
        devices.add(bias.device)
    if len(devices) > 1:
        raise ValueError(
            f"hidden, lm_head weight/bias and targets are on different devices {sorted(map(str, devices))}; "
            "move the targets with targets.to(hidden.device)"
        )


def _prepare(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: KDTargets,
    temperature: float,
    dtype: torch.dtype,
) -> _Prepared:
    _check_shapes(hidden, weight, bias, targets)
    vocab = weight.shape[0]
    kd_mask = targets.mask
    lp = targets.logprobs.to(dtype)
    tail = targets.tail_logprob.to(dtype)
    ids = targets.token_ids.long()
    # NaN counts as a filled slot here so that the check below reports it instead of dropping it.
    valid = (lp != _NEG_INF) & kd_mask[:, None]
    has_ids = valid.any(1)
    tail_mass = (tail > _NEG_INF) & kd_mask

    labels = targets.labels.long()
    has_label = labels != -100

    # Duplicate check: empty slots get distinct negative ids so they never collide.
    slot = torch.arange(ids.shape[1], device=ids.device)
    dedup = torch.where(valid, ids, -1 - slot).sort(1).values
    duplicates = (dedup[:, 1:] == dedup[:, :-1]) & (dedup[:, 1:] >= 0)
    bad_id = valid & ((ids < 0) | (ids >= vocab))
    checks = torch.stack(
        [
            bad_id.any(),
            (has_label & ((labels < 0) | (labels >= vocab))).any(),
            (valid & lp.isnan()).any() | (kd_mask & tail.isnan()).any(),
            (kd_mask & ~has_ids & ~tail_mass).any(),
            duplicates.any(),
            kd_mask.sum(),
            has_label.sum(),
        ]
    ).tolist()  # one host sync for every check
    if checks[0]:
        row, col = bad_id.nonzero()[0].tolist()
        raise ValueError(
            f"targets.token_ids[{row}, {col}] = {ids[row, col].item()} is outside the student vocabulary "
            f"[0, {vocab}); map teacher ids to student ids first, or mark the slot empty (logprob -inf)"
        )
    if checks[1]:
        raise ValueError(
            f"targets.labels has ids outside [0, {vocab}); use -100 for positions without a label"
        )
    if checks[2]:
        raise ValueError("targets.logprobs or targets.tail_logprob contain NaN at masked positions")
    if checks[3]:
        raise ValueError(
            "a masked position has no teacher mass (all logprobs -inf and tail_logprob -inf); "
            "set targets.mask to False there"
        )
    if checks[4]:
        raise ValueError(
            "a row of targets.token_ids repeats an id; each teacher id may appear once per position"
        )

    # Empty slots point at the row's first real id: scatters of -inf/restores then stay consistent
    # for duplicates, and gathers never index out of range. Rows without ids use 0 (handled later).
    if ids.shape[1] > 0:
        first = torch.where(valid, ids, 0).gather(1, valid.to(torch.uint8).argmax(1, keepdim=True))
        ids = torch.where(valid, ids, first)

    # Teacher p^(1/T) renormalised over the k ids plus the tail. Unmasked rows become "all mass in
    # the tail" so that every later quantity stays finite there (they are weighted 0 anyway).
    a_k = torch.where(valid, lp / temperature, _NEG_INF)
    a_t = torch.where(kd_mask, tail / temperature, 0.0)
    log_z = torch.logsumexp(torch.cat([a_k, a_t[:, None]], 1), 1)
    return _Prepared(
        ids=ids,
        valid=valid,
        has_ids=has_ids,
        alpha_k=a_k - log_z[:, None],
        alpha_t=a_t - log_z,
        kd_mask=kd_mask,
        labels=torch.where(has_label, labels, 0),
        has_label=has_label,
        n_kd=int(checks[5]),
        n_ce=int(checks[6]),
    )


def _bucket_terms(
    kind: str,
    alpha_k: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_k: torch.Tensor,
    sigma_t: torch.Tensor,
    valid: torch.Tensor,
    eps: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss, h_k = dL/dlog q_k [c, k], h_t = dL/dlog t and w = h_t / t [c].

    alpha/sigma are teacher/student bucket log-probs (-inf at empty slots; sigma_t -inf when the
    ids cover the vocabulary). torch.where guards every 0 * log 0; nothing here is differentiated
    by autograd, so NaN in an unselected branch is harmless.
    """
    log_eps = math.log(eps)
    zero = alpha_t.new_zeros(())
    if kind == "forward_kl_tail":
        p_k, p_t = alpha_k.exp(), alpha_t.exp()
        open_tail = sigma_t > log_eps  # below eps the clamp makes the tail term constant
        loss = torch.where(valid, p_k * (alpha_k - sigma_k), zero).sum(1) + p_t * (
            alpha_t.clamp_min(log_eps) - sigma_t.clamp_min(log_eps)
        )
        h_k = -p_k
        h_t = torch.where(open_tail, -p_t, zero)
        w = torch.where(open_tail, -(alpha_t - sigma_t).exp(), zero)
    elif kind == "topk_kl":
        # Renormalising the student over K cancels its full-vocabulary log-partition: the tail
        # gets no gradient at all (h_t = w = 0).
        has = valid.any(1, keepdim=True)
        a_n = alpha_k - torch.where(has, torch.logsumexp(alpha_k, 1, keepdim=True), zero)
        s_n = sigma_k - torch.where(has, torch.logsumexp(sigma_k, 1, keepdim=True), zero)
        p_n, q_n = a_n.exp(), s_n.exp()
        loss = torch.where(valid, p_n * (a_n - s_n), zero).sum(1)
        h_k = torch.where(valid, q_n - p_n, zero)
        h_t = w = torch.zeros_like(alpha_t)
    elif kind == "reverse_kl":
        q_k, q_t = sigma_k.exp(), sigma_t.exp()
        a_t = alpha_t.clamp_min(log_eps)  # a teacher tail of 0 would make the KL infinite
        loss = torch.where(valid, q_k * (sigma_k - alpha_k), zero).sum(1) + torch.where(
            q_t > 0, q_t * (sigma_t - a_t), zero
        )
        h_k = torch.where(valid, q_k * (sigma_k - alpha_k + 1), zero)
        w = torch.where(sigma_t > _NEG_INF, sigma_t - a_t + 1, zero)
        h_t = q_t * w
    elif kind == "jsd":
        lb, l1b = math.log(beta), math.log1p(-beta)
        m_k = torch.logaddexp(lb + alpha_k, l1b + sigma_k)
        m_t = torch.logaddexp(lb + alpha_t, l1b + sigma_t)
        p_k, p_t, q_k, q_t = alpha_k.exp(), alpha_t.exp(), sigma_k.exp(), sigma_t.exp()
        kl_p = torch.where(p_k > 0, p_k * (alpha_k - m_k), zero).sum(1) + torch.where(
            p_t > 0, p_t * (alpha_t - m_t), zero
        )
        kl_q = torch.where(q_k > 0, q_k * (sigma_k - m_k), zero).sum(1) + torch.where(
            q_t > 0, q_t * (sigma_t - m_t), zero
        )
        loss = beta * kl_p + (1 - beta) * kl_q
        # d/dq_j of the JSD is (1 - beta) log(q_j / m_j): the terms through m cancel.
        h_k = torch.where(q_k > 0, (1 - beta) * q_k * (sigma_k - m_k), zero)
        w = torch.where(sigma_t > _NEG_INF, (1 - beta) * (sigma_t - m_t), zero)
        h_t = q_t * w
    else:
        raise ValueError(f"unknown loss kind {kind!r}; choose forward_kl_tail, topk_kl, reverse_kl or jsd")
    return loss, h_k, h_t, w


def _chunk(
    z: torch.Tensor,
    prep: _Prepared,
    sl: slice,
    config: LossConfig,
    kd_coef: torch.Tensor | None,
    ce_coef: torch.Tensor | None,
    need_ce: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row KD and CE for one chunk of logits z [c, V] (consumed in place).

    kd_coef / ce_coef [c]: d total / d row loss; when given, also returns dTotal/dz [c, V].
    """
    temp = config.temperature
    ids, valid = prep.ids[sl], prep.valid[sl]
    ce = None
    if need_ce:
        labels = prep.labels[sl, None]
        lse1 = torch.logsumexp(z, 1)
        ce = lse1 - z.gather(1, labels)[:, 0]
    u = z.div_(temp) if temp != 1.0 else z
    lse = torch.logsumexp(u, 1) if temp != 1.0 or not need_ce else lse1

    # Student log-mass outside the k ids, summed directly over those ids (not 1 - Q_K, which
    # cancels catastrophically when the student puts almost everything on K).
    u_k = u.gather(1, ids)
    u.scatter_(1, ids, _NEG_INF)
    lse_out = torch.logsumexp(u, 1)
    u.scatter_(1, ids, u_k)
    sigma_k = torch.where(valid, u_k - lse[:, None], _NEG_INF)
    sigma_t = torch.where(prep.has_ids[sl], lse_out - lse, 0.0)

    kd, h_k, h_t, w = _bucket_terms(
        config.kind, prep.alpha_k[sl], prep.alpha_t[sl], sigma_k, sigma_t, valid, config.eps, config.jsd_beta
    )
    if kd_coef is None:
        return kd, ce, None

    coef = kd_coef / temp  # chain rule through u = z / T
    big_h = h_k.sum(1) + h_t
    grad = (u - lse[:, None]).exp_().mul_((coef * (w - big_h))[:, None])
    q_k = sigma_k.exp()
    # scatter_add: empty slots add 0, so the ids they share with a real slot are not overwritten.
    grad.scatter_add_(1, ids, torch.where(valid, coef[:, None] * (h_k - q_k * w[:, None]), 0.0))
    if ce_coef is not None:
        # softmax(z) at T = 1, built in u's storage (u is not needed any more).
        z1 = u.mul_(temp) if temp != 1.0 else u
        grad.add_(z1.sub_(lse1[:, None]).exp_().mul_(ce_coef[:, None]))
        grad.scatter_add_(1, prep.labels[sl, None], -ce_coef[:, None])
    return kd, ce, grad


def _logits(
    h: torch.Tensor, w_mm: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    z = (h.to(w_mm.dtype) @ w_mm.T).to(dtype)
    return z.add_(bias) if bias is not None else z


def _run(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: KDTargets,
    config: LossConfig,
    grads: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, tuple[torch.Tensor | None, ...]]:
    dtype = _compute_dtype(hidden.dtype, weight.dtype)
    prep = _prepare(hidden, weight, bias, targets, config.temperature, dtype)
    mm_dtype = _MATMUL_DTYPES.get(config.matmul_dtype, dtype)
    w_mm = weight.to(mm_dtype)  # one cast per call, not per chunk
    b = bias.to(dtype) if bias is not None else None
    n = hidden.shape[0]
    temp2 = config.temperature**2
    # d total / d row loss: zero on unmasked / unlabelled rows.
    kd_coef = prep.kd_mask.to(dtype) * ((1 - config.ce_weight) * temp2 / max(prep.n_kd, 1))
    ce_coef = prep.has_label.to(dtype) * (config.ce_weight / max(prep.n_ce, 1))
    want = any(grads)
    g_hidden = torch.empty_like(hidden) if grads[0] else None
    g_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if grads[1] else None
    g_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if grads[2] else None
    kd_sum = torch.zeros((), dtype=dtype, device=hidden.device)
    ce_sum = torch.zeros((), dtype=dtype, device=hidden.device)
    for start in range(0, n, config.chunk_size):
        sl = slice(start, min(start + config.chunk_size, n))
        h = hidden[sl]
        z = _logits(h, w_mm, b, dtype)
        kd, ce, g = _chunk(
            z,
            prep,
            sl,
            config,
            kd_coef[sl] if want else None,
            ce_coef[sl] if want and config.ce_weight > 0 else None,
            need_ce=True,
        )
        del z
        kd_sum += torch.where(prep.kd_mask[sl], kd, 0.0).sum()
        ce_sum += torch.where(prep.has_label[sl], ce, 0.0).sum()
        if g is None:
            continue
        g_mm = g.to(mm_dtype)
        del g
        if g_hidden is not None:
            g_hidden[sl] = g_mm @ w_mm
        if g_weight is not None:
            if mm_dtype == dtype:
                g_weight.addmm_(g_mm.T, h.to(dtype))
            else:
                g_weight.add_(g_mm.T @ h.to(mm_dtype))
        if g_bias is not None:
            g_bias += g_mm.sum(0)
    kd_mean = kd_sum / max(prep.n_kd, 1)
    ce_mean = ce_sum / max(prep.n_ce, 1)
    loss = config.ce_weight * ce_mean + (1 - config.ce_weight) * temp2 * kd_mean
    return loss, kd_mean, ce_mean, prep.n_kd, (g_hidden, g_weight, g_bias)


class _ChunkedDistillation(torch.autograd.Function):
    """Loss in forward with its gradients computed alongside; backward only scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: KDTargets,
        config: LossConfig,
        info: list,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        loss, kd, ce, positions, (gh, gw, gb) = _run(hidden, weight, bias, targets, config, needs)
        info.append(positions)
        ctx.save_for_backward(gh, gw, gb)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss: torch.Tensor, _g_kd: torch.Tensor, _g_ce: torch.Tensor):  # type: ignore[override]
        gh, gw, gb = ctx.saved_tensors
        w_dtype, b_dtype = ctx.param_dtypes
        return (
            None if gh is None else gh * g_loss,
            None if gw is None else (gw * g_loss).to(w_dtype),
            None if gb is None else (gb * g_loss).to(b_dtype),
            None,
            None,
            None,
        )


def distillation_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: KDTargets,
    config: LossConfig | None = None,
    *,
    lm_head_bias: torch.Tensor | None = None,
) -> LossOutput:
    """Distillation loss of a student whose logits are ``hidden @ lm_head_weight.T (+ bias)``.

    hidden [N, d] (any float dtype; flatten batch x sequence first), lm_head_weight [V, d],
    targets for the same N positions in student-vocabulary ids. ``loss`` is differentiable with
    respect to hidden, weight and bias (first order only); the gradients are computed in this call
    (see the module docstring), so calling it costs a forward and a backward. Peak extra memory is
    O(chunk_size x V) in both passes, plus an fp32 [V, d] gradient accumulator when the weight
    needs a gradient. No masked positions (or N == 0) gives kd = 0 and zero gradients, not NaN.
    """
    config = config or LossConfig()
    tensors = (hidden, lm_head_weight) + ((lm_head_bias,) if lm_head_bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        info: list[int] = []
        loss, kd, ce = _ChunkedDistillation.apply(hidden, lm_head_weight, lm_head_bias, targets, config, info)
        return LossOutput(loss, kd, ce, info[0])
    with torch.no_grad():
        loss, kd, ce, positions, _ = _run(
            hidden, lm_head_weight, lm_head_bias, targets, config, (False, False, False)
        )
    return LossOutput(loss, kd, ce, positions)


def _per_position(
    logits_of: Callable[[slice], torch.Tensor],
    n: int,
    prep: _Prepared,
    chunk_size: int,
    eps: float,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    config = LossConfig(chunk_size=chunk_size, eps=eps)
    out = torch.zeros(n, dtype=dtype, device=device)
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        kd, _, _ = _chunk(logits_of(sl), prep, sl, config, None, None, need_ce=False)
        out[sl] = torch.where(prep.kd_mask[sl], kd, 0.0)
    return out


@torch.no_grad()
def per_position_kl(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: KDTargets,
    chunk_size: int = 1024,
    *,
    lm_head_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """forward_kl_tail at T = 1 for every position, [N] in fp32 (fp64 for fp64 inputs); 0 where
    targets.mask is False. For evaluation: no graph, logits built chunk_size positions at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(hidden.dtype, lm_head_weight.dtype)
    prep = _prepare(hidden, lm_head_weight, lm_head_bias, targets, 1.0, dtype)
    w = lm_head_weight.to(dtype)
    b = lm_head_bias.to(dtype) if lm_head_bias is not None else None
    return _per_position(
        lambda sl: _logits(hidden[sl], w, b, dtype),
        hidden.shape[0],
        prep,
        chunk_size,
        eps,
        dtype,
        hidden.device,
    )


@torch.no_grad()
def per_position_kl_from_logits(
    logits: torch.Tensor, targets: KDTargets, chunk_size: int = 1024, *, eps: float = 1e-6
) -> torch.Tensor:
    """per_position_kl for callers that already hold logits [N, V] (any float dtype; upcast to fp32
    one chunk at a time, never as a whole)."""
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be [N, V], got {tuple(logits.shape)}; flatten batch and sequence first"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(logits.dtype)
    # Shape checks reuse the hidden/weight path with zero-width stand-ins for hidden and weight.
    stand_in_h = logits.new_empty(logits.shape[0], 0)
    stand_in_w = logits.new_empty(logits.shape[1], 0)
    prep = _prepare(stand_in_h, stand_in_w, None, targets, 1.0, dtype)
    # .to() may return the caller's tensor; _chunk works in place, so copy when it did not.
    return _per_position(
        lambda sl: logits[sl].to(dtype, copy=True),
        logits.shape[0],
        prep,
        chunk_size,
        eps,
        dtype,
        logits.device,
    )
