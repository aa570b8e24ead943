"""The Quasar student: a looped hybrid of Quasar attention (EFLA) + latent memory, GLA and SMEBU MoE.

Read top to bottom:

    token ids -> embedding -> RMSNorm -> P (anchor)
    h = P
    for loop in range(num_loops):           the same block weights every loop
        for block in blocks:                 kinds cycle through layer_pattern ("Q" / "G")
            h = block(h)                     pre-norm mixer and FFN, each with a post-norm, scaled residual
        h = h + sigmoid(g_loop) * P'         anchor injection; P' = P with its gradient scaled by 1/num_loops
    h -> RMSNorm -> lm_head -> logits

Streaming: every recurrent state (attention states, conv tails, memory bank, unfinished memory
segment), one set per block and loop, lives in `QuasarCache`; its size does not grow with the
number of tokens seen.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from quasar.attention import GatedLinearAttention, QuasarAttention
from quasar.configuration import QuasarConfig
from quasar.layers import GatedRMSNorm, Packing, RMSNorm, ShortConv, SwiGLU, rotary_cos_sin
from quasar.memory import LatentMemory
from quasar.moe import RouterBalance, SMEBUMoE

State = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Recurrent cache
# ------------------------------------------------------------------------------------------------


class QuasarCache:
    """All recurrent state of a batch of streams: one nested dict of tensors per (loop, block),
    plus the number of tokens seen (the absolute position of the next token)."""

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[State | None] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []

        def walk(x):
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)

        for layer in self.layers:
            walk(layer)
        return out

    def nbytes(self) -> int:
        """Bytes held by the cache; bounded, independent of how many tokens were streamed."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        def pick(x):
            if isinstance(x, torch.Tensor):
                return x.index_select(0, beam_idx.to(x.device))
            if isinstance(x, dict):
                return {k: pick(v) for k, v in x.items()}
            return x

        self.layers = [pick(layer) for layer in self.layers]


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class GradScale(nn.Module):
    """Passes its input forward unchanged and scales the gradient flowing back by `scale`."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaleGrad.apply(x, self.scale)


class QuasarBlock(nn.Module):
    """One block of the body: h += r * norm(mixer(norm(h))); h += r * norm(ffn(norm(h))).

    kind "quasar": Quasar attention plus the latent memory read (both from the same normed input);
    kind "gla": gated linear attention. FFN: dense SwiGLU or SMEBU MoE.
    """

    def __init__(self, config: QuasarConfig, kind: str, use_moe: bool):
        super().__init__()
        self.kind, self.use_moe = kind, use_moe
        self.residual_scale = config.residual_scale
        d, eps = config.hidden_size, config.rms_norm_eps
        self.mixer_norm = RMSNorm(d, eps)
        self.mixer = QuasarAttention(config) if kind == "quasar" else GatedLinearAttention(config)
        self.memory = LatentMemory(config) if kind == "quasar" and config.use_memory else None
        self.mixer_out_norm = RMSNorm(d, eps)
        self.ffn_norm = RMSNorm(d, eps)
        self.ffn = SMEBUMoE(config) if use_moe else SwiGLU(d, config.intermediate_size)
        self.ffn_out_norm = RMSNorm(d, eps)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        state: State | None,
        router_bias: torch.Tensor | None,
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        state = state or {}
        x = self.mixer_norm(h)
        y, mixer_state = self.mixer(x, rope, state.get("mixer"), packing)
        new_state: State = {"mixer": mixer_state}
        if self.memory is not None:
            if packing is None:
                read, new_state["memory"] = self.memory(x, state.get("memory"))
            else:
                read, new_state["memory"] = self.memory(x, None, doc_offsets=packing.offsets)
            y = y + read
        h = h + self.residual_scale * self.mixer_out_norm(y)
        x = self.ffn_norm(h)
        counts = None
        if self.use_moe:
            y, counts = self.ffn(x, router_bias)
        else:
            y = self.ffn(x)
        h = h + self.residual_scale * self.ffn_out_norm(y)
        return h, new_state, counts


# ------------------------------------------------------------------------------------------------
# Hugging Face models
# ------------------------------------------------------------------------------------------------


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class QuasarPreTrainedModel(PreTrainedModel):
    config_class = QuasarConfig
    config: QuasarConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["QuasarBlock"]
    _keep_in_fp32_modules = ["router_balance"]
    supports_gradient_checkpointing = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader, made as strict as `quasar.checkpoint.load_checkpoint`: safetensors
        only; a config.json field that is not ours (or the published silx-ai format, which has its
        importer), a missing, unexpected or mis-shaped tensor, or a non-finite value raises
        CheckpointError instead of leaving randomly initialised weights behind a warning."""
        from pathlib import Path

        from quasar.checkpoint import check_weight_files, read_checkpoint_config
        from quasar.errors import CheckpointError

        if kwargs.get("ignore_mismatched_sizes") or kwargs.get("use_safetensors") is False:
            raise CheckpointError(
                "Quasar checkpoints load strictly from safetensors: ignore_mismatched_sizes=True and "
                "use_safetensors=False are not supported"
            )
        kwargs["use_safetensors"] = True
        want_info = kwargs.pop("output_loading_info", False)
        local = Path(str(pretrained_model_name_or_path)).expanduser()
        if local.is_dir():
            # Checked before transformers reads any tensor, so the error names what is wrong.
            given = kwargs.get("config")
            config = given if isinstance(given, QuasarConfig) else read_checkpoint_config(local)
            check_weight_files(local, config)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except RuntimeError as e:
            if "ignore_mismatched_sizes" in str(e):
                raise CheckpointError(
                    f"{pretrained_model_name_or_path}: a tensor's shape does not match its config.json"
                ) from None
            raise
        problems = []
        for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "mis-shaped")):  # fmt: skip
            names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
            if names:
                problems.append(f"{what} tensors {names[:5]}{' ...' if len(names) > 5 else ''}")
        if info.get("error_msgs"):
            problems.append("; ".join(map(str, info["error_msgs"]))[:500])
        if problems:
            raise CheckpointError(f"{pretrained_model_name_or_path}: " + "; ".join(problems))
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if (
                tensor.is_floating_point()
                and tensor.device.type != "meta"
                and not bool(torch.isfinite(tensor).all())
            ):
                raise CheckpointError(
                    f"{pretrained_model_name_or_path}: tensor {name!r} contains NaN or infinite values"
                )
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        cfg = self.config
        std = cfg.initializer_range
        # Depth-scaled init of every residual branch's output projection: L = blocks per loop x loops.
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers * cfg.num_loops)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, ShortConv):
            bound = 1.0 / math.sqrt(module.kernel_size)
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, RouterBalance):
            init.zeros_(module.bias)
            init.zeros_(module.momentum)

        if isinstance(module, QuasarAttention):
            u = torch.empty_like(module.beta_bias, device="cpu").uniform_(
                cfg.beta_init_min, cfg.beta_init_max
            )
            init.copy_(module.beta_bias, _inverse_softplus(u))
            if module.beta_proj is not None:
                init.zeros_(module.beta_proj.weight)
            init.normal_(module.o_proj.weight, mean=0.0, std=out_std)
        elif isinstance(module, GatedLinearAttention):
            init.normal_(module.o_proj.weight, mean=0.0, std=out_std)
        elif isinstance(module, LatentMemory):
            module.reset_parameters(cfg, out_std, init)
        elif isinstance(module, SMEBUMoE):
            init.normal_(module.experts_gate_up, mean=0.0, std=std)
            init.normal_(module.experts_down, mean=0.0, std=out_std)
            if module.latent_up is not None:
                init.normal_(module.latent_up.weight, mean=0.0, std=out_std)
        elif isinstance(module, SwiGLU):
            init.normal_(module.down_proj.weight, mean=0.0, std=out_std)
        elif isinstance(module, QuasarModel) and module.injection_logits is not None:
            p = cfg.looped_injection_init
            init.constant_(module.injection_logits, math.log(p / (1.0 - p)))


class QuasarModel(QuasarPreTrainedModel):
    """Embedding, anchor, looped body and final norm; returns the last hidden states."""

    def __init__(self, config: QuasarConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe_rows = {block: row for row, block in enumerate(config.moe_block_indices)}
        self.moe_row_of_block = [moe_rows.get(i) for i in range(config.num_hidden_layers)]
        self.blocks = nn.ModuleList(
            QuasarBlock(config, kind, use_moe=self.moe_row_of_block[i] is not None)
            for i, kind in enumerate(config.block_kinds)
        )
        self.router_balance = RouterBalance(config) if moe_rows else None
        use_injection = config.use_looped_injection
        self.injection_logits = nn.Parameter(torch.empty(config.num_loops)) if use_injection else None
        grad_scale = 1.0 / config.num_loops if use_injection and config.scale_injection_grad else 1.0
        self.anchor_grad_scale = GradScale(grad_scale)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._router_token_counts: torch.Tensor | None = None
        # Activation checkpointing per block (`gradient_checkpointing_enable()` sets it): recompute
        # each block in backward instead of keeping its activations.
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def num_cache_layers(self) -> int:
        return self.config.num_loops * self.config.num_hidden_layers

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: QuasarCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """cu_seqlens: cumulative offsets [N + 1] of N documents packed in one row (batch size 1):
        every document runs exactly as if alone (attention, conv, memory and RoPE restart at each
        boundary). Packed calls carry no cache."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "QuasarModel streams every sequence from its first token: padded batches (attention_mask "
                "with zeros) are not supported. Pass unpadded sequences of equal length, or batch size 1."
            )
        if past_key_values is not None and not isinstance(past_key_values, QuasarCache):
            raise TypeError(f"past_key_values must be a QuasarCache, got {type(past_key_values).__name__}")
        T = inputs_embeds.shape[1]
        packing = None
        if cu_seqlens is not None:
            if inputs_embeds.shape[0] != 1:
                raise ValueError(
                    f"cu_seqlens packs documents along time, so the batch size must be 1, got "
                    f"{inputs_embeds.shape[0]}; concatenate the rows and pass their offsets"
                )
            if past_key_values is not None or use_cache:
                raise ValueError(
                    "packed documents (cu_seqlens) cannot use a cache: call with use_cache=False"
                )
            use_cache = False
            packing = Packing.from_cu_seqlens(cu_seqlens, T, inputs_embeds.device)
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = QuasarCache(self.num_cache_layers)

        offset = past_key_values.seen_tokens if past_key_values is not None else 0
        rope = None
        if cfg.position_mode == "rope":
            if packing is not None:
                positions = packing.doc_positions
            else:
                positions = torch.arange(offset, offset + T, device=inputs_embeds.device)
            rope = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        anchor = self.embed_norm(inputs_embeds)
        injected = self.anchor_grad_scale(anchor)
        h = anchor
        n_blocks = len(self.blocks)
        counts = [None] * len(cfg.moe_block_indices)
        for loop in range(cfg.num_loops):
            for i, block in enumerate(self.blocks):
                slot = loop * n_blocks + i
                row = self.moe_row_of_block[i]
                bias = self.router_balance.bias[row] if row is not None else None
                state = past_key_values.layers[slot] if past_key_values is not None else None
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    h, new_state, block_counts = torch.utils.checkpoint.checkpoint(
                        block, h, rope, state, bias, packing, use_reentrant=False
                    )
                else:
                    h, new_state, block_counts = block(h, rope, state, bias, packing)
                if past_key_values is not None:
                    past_key_values.layers[slot] = new_state
                if block_counts is not None:
                    counts[row] = block_counts if counts[row] is None else counts[row] + block_counts
            if self.injection_logits is not None:
                h = h + torch.sigmoid(self.injection_logits[loop]).to(h.dtype) * injected
        if past_key_values is not None:
            past_key_values.seen_tokens += T
        if self.training and counts:
            # Counted here, outside the blocks, so activation recomputation never counts twice.
            step_counts = torch.stack(counts).detach()
            self._router_token_counts = (
                step_counts if self._router_token_counts is None else self._router_token_counts + step_counts
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), past_key_values=past_key_values)


class QuasarForCausalLM(QuasarPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QuasarConfig):
        super().__init__(config)
        self.model = QuasarModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the recurrent QuasarCache is created by the model itself

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: QuasarCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cu_seqlens=cu_seqlens,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if cu_seqlens is not None:  # the first token of a document is not predicted by the previous one
                labels = labels.clone()
                labels[:, cu_seqlens[1:-1].long()] = -100
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: QuasarCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # Feed only the tokens the cache has not seen yet.
        if past_key_values is not None and past_key_values.seen_tokens > 0:
            return {
                "input_ids": input_ids[:, past_key_values.seen_tokens :],
                "past_key_values": past_key_values,
                "use_cache": use_cache,
            }
        inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
        return {**inputs, "past_key_values": past_key_values, "use_cache": use_cache}

    # ---- SMEBU -------------------------------------------------------------------------------------

    def pop_router_token_counts(self) -> torch.Tensor | None:
        """Tokens routed to each expert [n_moe_layers, E] by training forwards since the last call; resets."""
        counts, self.model._router_token_counts = self.model._router_token_counts, None
        return counts

    def update_router_bias(self, token_counts: torch.Tensor) -> None:
        """SMEBU bias update for every MoE layer at once; call after each optimizer step with the
        step's token counts summed across data-parallel ranks (so every rank ends identical)."""
        if self.model.router_balance is None:
            raise ValueError(
                "this model has no MoE layers (num_experts=0): there is no router bias to update"
            )
        self.model.router_balance.update(token_counts)

    # ---- sizes -------------------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and active parameters per token (excluding the input embedding table,
        counting only num_experts_per_tok of each layer's routed experts). Works on the meta device."""
        cfg = self.config
        total = sum(p.numel() for p in self.parameters())
        inactive = 0 if cfg.tie_word_embeddings else self.model.embed_tokens.weight.numel()
        for block in self.model.blocks:
            if block.use_moe:
                routed = block.ffn.experts_gate_up.numel() + block.ffn.experts_down.numel()
                inactive += routed * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
        return {"total": total, "active": total - inactive}
