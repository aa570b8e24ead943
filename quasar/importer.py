"""Import a checkpoint in the published silx-ai Quasar format (`silx-ai/Quasar-3B-A1B-Preview`).

`python -m quasar import-published SRC OUT` reads the published config.json and safetensors (never
any code: `auto_map` is ignored), builds the matching `QuasarConfig`, maps every tensor onto our
names and layouts and writes a normal checkpoint of ours that every command of the project loads.

What the published forward pass is, and how it is reproduced (`../shared/docs/reference.md` 1.2):

- sandwich RMSNorms with residual scale 0.1: our block as is (ln1/ln1_out/ln2/ln2_out);
- no positions applied (the published layers ignore the RoPE tables they are given):
  `position_mode="none"`;
- Quasar attention: short conv + SiLU on q, k, v, one constant beta per head, output scale 1.0, a
  sigmoid-gated output norm: `data_dependent_beta=False`, `quasar_attention_scale=1.0`;
- GLA as in flash-linear-attention, whose output norm keeps its library eps of 1e-5: `gla_norm_eps`;
- BigMac MoE: experts in a down-projected latent space, chosen by top-k of sigmoid(logits) + SMEBU
  bias, mixed by a softmax over the chosen experts' raw logits (`router_mixing="softmax"`), output
  (shared + routed) / 2: the 1/2 is folded into the two output projections (`latent_up` and the
  shared expert's `down_proj`), which is exact because both are linear.

What is dropped, and why (listed in every import report):

- the published latent memory (on the GLA layers): it writes the whole sequence before it reads,
  so every token reads summaries of the future; we do not reproduce that. `--add-memory` adds our
  causal memory instead, with a read that contributes exactly zero until distillation trains it;
- the looped-injection gates (injection is off in the published configuration; refused when on);
- monitoring buffers (`max_vio`), which nothing reads in the forward pass.

The import streams one tensor at a time (memory ~ the largest tensor, not the model twice) into a
temporary directory that is renamed to OUT at the end, so an interrupted import leaves nothing.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from quasar.configuration import QuasarConfig
from quasar.files import fsync_dir

MAX_CONFIG_BYTES = 1 << 20
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json"]
REPORT_KEY = "quasar_import"  # safetensors metadata key holding the import report

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_FP32_TARGETS = ("model.router_balance.",)  # SMEBU bias and momentum: a 2e-3 update vanishes in bf16


class ImportRefused(ValueError):
    """The source cannot be reproduced by our model; the message names the field or tensor and why."""


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

# What the published configuration class assumes for a field its config.json leaves out.
PUBLISHED_DEFAULTS: dict[str, Any] = {
    "vocab_size": 248_320, "d_model": 1536, "n_layers": 24, "n_heads": 12, "d_ff": 4096,
    "head_dim": 128, "max_seq_len": 16_384, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "quasar_layers": 4, "gated_layers": 2, "use_gla_first": False, "use_short_conv": True,
    "conv_size": 4, "conv_bias": False, "allow_neg_eigval": False, "expand_k": 0.5, "expand_v": 1.0,
    "memory_slots": 128, "memory_dim": 128, "moe_type": "bigmac", "num_shared_experts": 1,
    "num_routed_experts": 64, "top_k": 4, "shared_expert_size": 3072, "routed_expert_size": 256,
    "dense_input_layers": 4, "bigmac_r": 0.25, "smebu_kappa": 2.0, "smebu_lambda": 2e-3,
    "smebu_beta": 0.5, "num_loops": 1, "use_looped_injection": False, "rope_theta": 1e6,
    "residual_scale": 0.1, "hidden_act": "silu", "pad_token_id": None, "bos_token_id": 1,
    "eos_token_id": 2, "num_v_heads": None,
}  # fmt: skip

# Aliases the published class writes beside its own fields; they must agree with them.
_ALIASES = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_heads": "n_heads",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_heads", "intermediate_size": "d_ff",
    "max_position_embeddings": "max_seq_len", "norm_eps": "rms_norm_eps",
}  # fmt: skip

# Published fields that only steer training, kernels or bookkeeping: they do not change what the
# model computes at evaluation, so they are read and ignored.
_IGNORED_FIELDS = frozenset(
    {
        "_name_or_path", "architectures", "auto_map", "transformers_version", "model_type", "dtype",
        "torch_dtype", "id2label", "label2id", "output_attentions", "output_hidden_states",
        "return_dict", "problem_type", "is_encoder_decoder", "chunk_size_feed_forward",
        "attn_mode", "gla_mode", "fuse_cross_entropy", "fuse_norm", "fuse_swiglu",
        "gradient_checkpointing", "dropout", "use_cache", "use_l2warp", "moe_aux_loss_coeff",
        "moe_z_loss_coeff", "looped_injection_init", "hidden_ratio", "initializer_range",
        "hybrid_layer_types", "layer_types",  # checked in _layer_kinds
    }
)  # fmt: skip
_KNOWN_FIELDS = frozenset(PUBLISHED_DEFAULTS) | frozenset(_ALIASES) | _IGNORED_FIELDS | {"bigmac_expert_size"}

# flash-linear-attention's GatedLinearAttention layer builds its output norm with its own default
# eps; the published model does not pass its norm_eps to it.
PUBLISHED_GLA_NORM_EPS = 1e-5
MEMORY_SEGMENT_SIZE = 64  # hard-coded in the published memory


def _refuse(field_name: str, value: Any, why: str) -> ImportRefused:
    return ImportRefused(f"published config.json: {field_name}={value!r}: {why}")


def _layer_kinds(c: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """The published layer cycle: `quasar_layers` Quasar layers then `gated_layers` GLA layers,
    repeated (the published class recomputes `hybrid_layer_types` from them; a listed one must agree)."""
    if c["use_gla_first"]:
        raise _refuse("use_gla_first", c["use_gla_first"], "GLA-first layer order is not reproduced")
    nq, ng, n = c["quasar_layers"], c["gated_layers"], c["n_layers"]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (nq, ng)) or nq + ng == 0:
        raise _refuse(
            "quasar_layers", (nq, ng), "quasar_layers and gated_layers must be counts >= 0, not both 0"
        )
    period = ["quasar"] * nq + ["gla"] * ng
    kinds = [period[i % len(period)] for i in range(n)]
    listed = raw.get("hybrid_layer_types")
    if listed is not None and listed != kinds:
        raise _refuse("hybrid_layer_types", listed, f"disagrees with quasar_layers={nq}, gated_layers={ng}")
    layer_types = raw.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or set(layer_types) - {"linear_attention"}
    ):
        raise _refuse("layer_types", layer_types, "only linear-attention layers are reproduced")
    return kinds


def _shortest_period(kinds: list[str]) -> str:
    letters = "".join("Q" if k == "quasar" else "G" for k in kinds)
    for p in range(1, len(letters) + 1):
        if len(letters) % p == 0 and letters[:p] * (len(letters) // p) == letters:
            return letters[:p]
    return letters


def published_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The published config.json's fields, with the published class's defaults for absent ones and
    its aliases checked against the fields they stand for."""
    unknown = sorted(set(raw) - _KNOWN_FIELDS)
    if unknown:
        raise ImportRefused(
            f"published config.json: unknown field(s) {', '.join(unknown)}: the importer does not know what "
            "they change, so it does not guess; check the published revision"
        )
    c = {**PUBLISHED_DEFAULTS, **{k: v for k, v in raw.items() if k in PUBLISHED_DEFAULTS}}
    for alias, name in _ALIASES.items():
        if (
            alias in raw
            and raw[alias] != c[name]
            and not (alias == "num_key_value_heads" and raw[alias] is None)
        ):
            raise _refuse(alias, raw[alias], f"disagrees with {name}={c[name]!r}")
    return c


def published_config(raw: dict[str, Any], *, add_memory: bool = False) -> QuasarConfig:
    """Our QuasarConfig for a published config.json; ImportRefused names the first field it cannot reproduce."""
    c = published_fields(raw)

    def need_int(name: str, minimum: int = 1) -> int:
        value = c[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise _refuse(name, value, f"must be an integer >= {minimum}")
        return value

    def need(name: str, allowed: tuple, why: str) -> None:
        if c[name] not in allowed:
            raise _refuse(name, c[name], why)

    for name in ("d_model", "n_layers", "n_heads", "head_dim", "vocab_size", "d_ff", "conv_size",
                 "num_routed_experts", "top_k", "routed_expert_size", "num_loops", "max_seq_len"):  # fmt: skip
        need_int(name)
    need_int("dense_input_layers", minimum=0)
    need_int("shared_expert_size", minimum=0)
    kinds = _layer_kinds(c, raw)
    need("moe_type", ("bigmac",), "only the BigMac mixture of experts is reproduced")
    need("num_shared_experts", (0, 1), "at most one shared expert is reproduced")
    need("use_short_conv", (True,), "Quasar layers without short convolutions are not reproduced")
    need("conv_bias", (False,), "short convolutions with a bias are not reproduced")
    need("allow_neg_eigval", (False,), "negative eigenvalues (beta up to 2) are not reproduced")
    need("hidden_act", ("silu",), "only SiLU (SwiGLU) feed-forwards are reproduced")
    need(
        "use_looped_injection",
        (False,),
        "looped injection (a gate before every layer) is not reproduced; import a model with it off",
    )
    need("num_v_heads", (None, c["n_heads"]), f"must be null or n_heads={c['n_heads']}")
    need("expand_v", (1, 1.0), "Quasar value heads wider than the keys (expand_v != 1) are not reproduced")

    d, r = c["d_model"], c["bigmac_r"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise _refuse("bigmac_r", r, "must be in (0, 1]")
    latent = int(d * r)  # the published layer truncates
    hidden = raw.get("bigmac_expert_size", int(c["routed_expert_size"] / r))
    if c["dense_input_layers"] > c["n_layers"]:
        raise _refuse("dense_input_layers", c["dense_input_layers"], f"must be <= n_layers={c['n_layers']}")
    shared = c["shared_expert_size"] if c["num_shared_experts"] else 0

    memory: dict[str, Any] = {"use_memory": False}
    if add_memory:
        memory = dict(
            use_memory=True,
            memory_slots=need_int("memory_slots"),
            memory_dim=need_int("memory_dim"),
            memory_segment_size=MEMORY_SEGMENT_SIZE,
        )
    try:
        return QuasarConfig(
            vocab_size=c["vocab_size"],
            hidden_size=d,
            num_hidden_layers=c["n_layers"],
            layer_pattern=_shortest_period(kinds),
            num_loops=c["num_loops"],
            num_heads=c["n_heads"],
            head_dim=c["head_dim"],
            conv_size=c["conv_size"],
            data_dependent_beta=False,
            output_gate_rank=c["head_dim"],
            quasar_attention_scale=1.0,
            gla_num_heads=c["n_heads"],
            gla_expand_k=float(c["expand_k"]),
            gla_expand_v=float(c["expand_v"]),
            gla_gate_rank=16,
            gla_gate_logit_normalizer=16.0,
            gla_norm_eps=PUBLISHED_GLA_NORM_EPS,
            **memory,
            dense_layers=c["dense_input_layers"],
            intermediate_size=c["d_ff"],
            num_experts=c["num_routed_experts"],
            num_experts_per_tok=c["top_k"],
            expert_intermediate_size=hidden,
            moe_latent_size=latent,
            shared_expert_intermediate_size=shared,
            smebu_kappa=float(c["smebu_kappa"]),
            smebu_lambda=float(c["smebu_lambda"]),
            smebu_beta=float(c["smebu_beta"]),
            router_mixing="softmax",
            use_looped_injection=False,
            position_mode="none",
            rope_theta=float(c["rope_theta"]),
            max_position_embeddings=c["max_seq_len"],
            residual_scale=float(c["residual_scale"]),
            rms_norm_eps=float(c["rms_norm_eps"]),
            tie_word_embeddings=bool(c["tie_word_embeddings"]),
            bos_token_id=c["bos_token_id"],
            eos_token_id=c["eos_token_id"],
            pad_token_id=c["pad_token_id"],
        )
    except (TypeError, ValueError) as e:
        raise ImportRefused(f"published config.json describes a model we cannot build: {e}") from None


# ------------------------------------------------------------------------------------------------
# Tensor mapping
# ------------------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _conv(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[-1])  # depthwise Conv1d [C, 1, K] -> ours [C, K]


def _half(t: torch.Tensor) -> torch.Tensor:
    return t * 0.5  # the published MoE output is (shared + routed) / 2


@dataclass(frozen=True)
class Mapped:
    target: str
    transform: Transform = _same
    source_shape: Callable[[tuple[int, ...]], tuple[int, ...]] = tuple  # source shape -> target shape


@dataclass(frozen=True)
class Dropped:
    why: str


DROP_MEMORY = (
    "published latent memory: it writes the whole sequence before reading, so every token reads the "
    "future; not reproduced (--add-memory adds our causal one)"
)
DROP_INJECTION = "looped-injection gate: injection is off in this configuration"
DROP_MONITOR = "monitoring buffer: not used by the forward pass"
DROP_ROPE = "RoPE frequency table: the published layers apply no positions"


def _conv_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[-1]) if len(shape) == 3 and shape[1] == 1 else shape


def expected_sources(config: QuasarConfig) -> dict[str, Mapped]:
    """Every tensor name the published model saves for `config`, mapped to ours."""
    out: dict[str, Mapped] = {
        "model.embed_tokens.weight": Mapped("model.embed_tokens.weight"),
        "model.embed_norm.weight": Mapped("model.embed_norm.weight"),
        "model.norm.weight": Mapped("model.norm.weight"),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = Mapped("lm_head.weight")
    if config.moe_block_indices:
        out["model.all_moe_bias"] = Mapped("model.router_balance.bias")
        out["model.all_moe_momentum"] = Mapped("model.router_balance.momentum")
    moe = set(config.moe_block_indices)
    for i, kind in enumerate(config.block_kinds):
        src, dst = f"model.layers.{i}.", f"model.blocks.{i}."
        for a, b in (("ln1", "mixer_norm"), ("ln1_out", "mixer_out_norm"), ("ln2", "ffn_norm"), ("ln2_out", "ffn_out_norm")):  # fmt: skip
            out[f"{src}{a}.weight"] = Mapped(f"{dst}{b}.weight")
        attn, mixer = f"{src}attn.", f"{dst}mixer."
        pairs = [("q_proj.weight", "q_proj.weight"), ("k_proj.weight", "k_proj.weight"),
                 ("v_proj.weight", "v_proj.weight"), ("o_proj.weight", "o_proj.weight")]  # fmt: skip
        if kind == "quasar":
            pairs += [("beta_log", "beta_bias"), ("g_proj.0.weight", "gate_down.weight"),
                      ("g_proj.1.weight", "gate_up.weight"), ("g_proj.1.bias", "gate_up.bias"),
                      ("o_norm.weight", "o_norm.weight")]  # fmt: skip
            for c in "qkv":
                out[f"{attn}{c}_conv1d.weight"] = Mapped(f"{mixer}{c}_conv.weight", _conv, _conv_shape)
        else:
            pairs += [("gk_proj.0.weight", "gk_down.weight"), ("gk_proj.1.weight", "gk_up.weight"),
                      ("gk_proj.1.bias", "gk_up.bias"), ("g_proj.weight", "g_proj.weight"),
                      ("g_norm_swish_gate.weight", "o_norm.weight")]  # fmt: skip
        for a, b in pairs:
            out[attn + a] = Mapped(mixer + b)
        ffn, ours = f"{src}ffn.", f"{dst}ffn."
        if i in moe:
            out[f"{ffn}router.router_weights"] = Mapped(f"{ours}router.weight")
            out[f"{ffn}w_down_proj.weight"] = Mapped(f"{ours}latent_down.weight")
            # (shared + routed) / 2 with a shared expert, routed alone without one
            fold = _half if config.shared_expert_intermediate_size else _same
            out[f"{ffn}w_up_proj.weight"] = Mapped(f"{ours}latent_up.weight", fold)
            out[f"{ffn}experts_w12"] = Mapped(f"{ours}experts_gate_up")
            out[f"{ffn}experts_w3"] = Mapped(f"{ours}experts_down")
            if config.shared_expert_intermediate_size:
                shared = f"{ffn}shared_experts.0."
                out[f"{shared}gate.weight"] = Mapped(f"{ours}shared_expert.gate_proj.weight")
                out[f"{shared}up.weight"] = Mapped(f"{ours}shared_expert.up_proj.weight")
                out[f"{shared}down.weight"] = Mapped(f"{ours}shared_expert.down_proj.weight", _half)
        else:
            for a, b in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out[f"{ffn}{a}.weight"] = Mapped(f"{ours}{b}.weight")
    return out


def _droppable(name: str, n_layers: int, moe: set[int]) -> Dropped | None:
    if name == "model.all_moe_max_vio":
        return Dropped(DROP_MONITOR)
    if re.fullmatch(r"model\.(rotary_emb|rotary|layers\.\d+\.attn\.rotary)\.inv_freq", name):
        return Dropped(DROP_ROPE)
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
    if not m or int(m.group(1)) >= n_layers:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if rest.startswith("memory.") or rest in ("C_to_hidden.weight", "W_alpha.weight", "W_alpha.bias"):
        return Dropped(DROP_MEMORY)
    if rest == "injection_gate":
        return Dropped(DROP_INJECTION)
    if rest == "ffn.max_vio" and i in moe:
        return Dropped(DROP_MONITOR)
    return None


@dataclass
class ImportPlan:
    """What an import writes: our config, every target tensor in order (with its source, or
    None for a tensor we add), and every source tensor left out with the reason."""

    config: QuasarConfig
    writes: list[tuple[str, str | None, Mapped | None, tuple[int, ...]]] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # source name -> why

    def dropped_summary(self) -> list[tuple[str, int]]:
        """(reason, number of tensors) for the report."""
        counts: dict[str, int] = {}
        for why in self.dropped.values():
            counts[why] = counts.get(why, 0) + 1
        return sorted(counts.items(), key=lambda kv: -kv[1])


def plan_import(config: QuasarConfig, source_shapes: dict[str, tuple[int, ...]]) -> ImportPlan:
    """Map every source tensor (name -> shape) or refuse: unknown, missing or mis-shaped tensors."""
    with torch.device("meta"):
        from quasar.modeling import QuasarForCausalLM

        model = QuasarForCausalLM(config)
    target_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        target_shapes.pop("lm_head.weight", None)
    expected = expected_sources(config)
    moe = set(config.moe_block_indices)
    plan = ImportPlan(config)

    unknown = []
    for name in source_shapes:
        if name in expected:
            continue
        dropped = _droppable(name, config.num_hidden_layers, moe)
        if dropped is None:
            unknown.append(name)
        else:
            plan.dropped[name] = dropped.why
    if unknown:
        raise ImportRefused(
            f"{len(unknown)} tensor(s) the published {config.num_hidden_layers}-layer model does not have: "
            f"{', '.join(sorted(unknown)[:5])}{' ...' if len(unknown) > 5 else ''}; the checkpoint is not "
            "in the format this importer reproduces"
        )
    missing = sorted(set(expected) - set(source_shapes))
    if missing:
        raise ImportRefused(
            f"{len(missing)} tensor(s) missing from the checkpoint: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}"
        )
    mapped_targets = set()
    by_target = {m.target: (src, m) for src, m in expected.items()}
    for target, shape in target_shapes.items():
        if target not in by_target:
            continue
        src, m = by_target[target]
        got = tuple(m.source_shape(tuple(source_shapes[src])))
        if got != shape:
            raise ImportRefused(
                f"tensor {src!r} has shape {tuple(source_shapes[src])}, but the published config.json implies "
                f"{shape} for it (our {target!r}): the weights do not match their config"
            )
        mapped_targets.add(target)
    for target, shape in target_shapes.items():
        if target in mapped_targets:
            src, m = by_target[target]
            plan.writes.append((target, src, m, shape))
        elif config.use_memory and ".memory." in target:
            plan.writes.append((target, None, None, shape))  # our causal memory, added fresh
        else:
            raise ImportRefused(f"internal: no source for our tensor {target!r}")  # a mapping table bug
    return plan


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def resolve_source(
    src: str, revision: str | None = None, *, cache_dir: str | None = None, max_gb: float = 16.0
) -> Path:
    """A local directory, or a Hub id downloaded at a pinned commit (config + safetensors only)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ImportRefused(f"{src} is a local directory: --revision is only for Hub ids")
        return path
    if path.exists():
        raise ImportRefused(f"{src} is a file; give the checkpoint's directory or a Hub id")
    if not HUB_ID.match(src):
        raise ImportRefused(f"{src}: no such directory, and not a Hub id of the form owner/name")
    if revision is None or not COMMIT_SHA.match(revision):
        raise ImportRefused(
            f"{src}: a Hub id needs --revision with the full 40-character commit sha (got {revision!r}), "
            "so that everyone imports the same weights; find it on the model page under 'Files and versions'"
        )
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(src, revision=revision, files_metadata=True)
    wanted = [
        s for s in info.siblings or [] if s.rfilename == "config.json" or s.rfilename.endswith(".safetensors")
    ]
    total = sum(s.size or 0 for s in wanted)
    if total > max_gb * 2**30:
        raise ImportRefused(
            f"{src}@{revision}: {total / 2**30:.1f} GiB of weights, more than --max-gb {max_gb}"
        )
    return Path(
        snapshot_download(repo_id=src, revision=revision, allow_patterns=HUB_FILES, cache_dir=cache_dir)
    )


def read_published_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ImportRefused(f"{path}: no config.json")
    if cfg.stat().st_size > MAX_CONFIG_BYTES:
        raise ImportRefused(f"{cfg}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImportRefused(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ImportRefused(f"{cfg}: not a JSON object")
    if raw.get("model_type") != "quasar":
        raise ImportRefused(f"{cfg}: model_type is {raw.get('model_type')!r}, expected 'quasar'")
    if "d_model" not in raw and "n_layers" not in raw:
        raise ImportRefused(
            f"{cfg}: not in the published format (no d_model / n_layers); if it is already one of our "
            "checkpoints, load it directly"
        )
    return raw


def _source_files(path: Path) -> list[Path]:
    """The weight files: those an index names, else model.safetensors, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ImportRefused(f"{index}: not a safetensors index ({e})") from None
        bad = [n for n in names if not isinstance(n, str) or "/" in n or not (path / n).is_file()]
        if bad:
            raise ImportRefused(f"{index}: names weight files that are not in {path}: {bad[:3]}")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    from quasar.checkpoint import CheckpointError, weight_files

    try:
        return weight_files(path)
    except CheckpointError as e:
        raise ImportRefused(str(e)) from None


def source_tensors(path: Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, safetensors dtype) over every weight file, without reading any data."""
    out: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in _source_files(path):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if name in out:
                    raise ImportRefused(f"tensor {name!r} appears in both {out[name][0].name} and {f.name}")
                sl = h.get_slice(name)
                out[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
    return out


# ------------------------------------------------------------------------------------------------
# Streaming writer
# ------------------------------------------------------------------------------------------------


class SafetensorsStreamWriter:
    """Writes one safetensors file tensor by tensor: the header (every name, dtype, shape and offset)
    first, then each tensor's bytes in order. Holds one tensor at a time."""

    def __init__(
        self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ):
        self.path, self.entries = path, entries
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _ST_DTYPE[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.entries[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"writer expected {want_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # little-endian hosts
        self._fh.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            self._fh.close()
            raise RuntimeError(f"writer closed after {self._next} of {len(self.entries)} tensors")
        self._fh.flush()
        import os

        os.fsync(self._fh.fileno())
        self._fh.close()


# ------------------------------------------------------------------------------------------------
# The import
# ------------------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    source: str
    revision: str | None
    out: Path
    config: QuasarConfig
    tensors_written: int
    tensors_added: int
    parameters: int
    source_parameters: int
    dropped: list[tuple[str, int]]
    dropped_parameters: int
    tokenizer: str | None = None
    token_ids: dict[str, int | None] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"imported {self.source}{'@' + self.revision if self.revision else ''} -> {self.out}",
            f"  {self.tensors_written} tensors written ({self.tensors_added} added), "
            f"{self.parameters:,} parameters (source {self.source_parameters:,})",
            f"  tokenizer: {self.tokenizer or 'none (token ids as published)'}; "
            + ", ".join(f"{k.split('_')[0]} {v}" for k, v in self.token_ids.items()),
        ]
        for why, n in self.dropped:
            out.append(f"  dropped {n} tensor(s): {why}")
        if self.dropped:
            out.append(f"  dropped parameters: {self.dropped_parameters:,}")
        return out


def _new_memory_tensors(config: QuasarConfig, seed: int) -> dict[str, torch.Tensor]:
    """Fresh values for our causal memory in every Quasar block, read contributing exactly zero."""
    from torch import nn

    from quasar.memory import LatentMemory

    out: dict[str, torch.Tensor] = {}
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        std = config.initializer_range
        out_std = std / math.sqrt(2 * config.num_hidden_layers * config.num_loops)
        for i, kind in enumerate(config.block_kinds):
            if kind != "quasar":
                continue
            mem = LatentMemory(config)
            with torch.no_grad():
                for sub in mem.modules():
                    if isinstance(sub, nn.Linear):
                        nn.init.normal_(sub.weight, 0.0, std)
                        if sub.bias is not None:
                            nn.init.zeros_(sub.bias)
            mem.reset_parameters(config, out_std, nn.init, closed_read=True)
            for k, v in mem.state_dict().items():
                out[f"model.blocks.{i}.memory.{k}"] = v
    finally:
        torch.random.set_rng_state(gen_state)
    return out


QWEN35_ROWS = 248_320  # the published vocabulary: Qwen3.5's 248,077 ids, padded
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_for(choice: str, vocab_size: int) -> tuple[str | None, Path | None, dict[str, int | None]]:
    """(what the tokenizer is, its directory, the bos/eos/pad ids it gives the config)."""
    if choice == "none" or (choice == "auto" and vocab_size != QWEN35_ROWS):
        return None, None, {}
    name = "qwen3.5" if choice == "auto" else choice
    from quasar.tokenizers import BUILTIN_TOKENIZERS, BuiltinTokenizerError, builtin_tokenizer

    try:
        directory = builtin_tokenizer(name) if name in BUILTIN_TOKENIZERS else Path(name).expanduser()
    except BuiltinTokenizerError as e:
        raise ImportRefused(f"--tokenizer {name}: {e} (or pass --tokenizer none)") from None
    if not (directory / "tokenizer.json").is_file():
        raise ImportRefused(f"--tokenizer {name}: {directory} has no tokenizer.json")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    if len(tok) > vocab_size:
        raise ImportRefused(
            f"--tokenizer {name}: {len(tok):,} tokens do not fit the model's {vocab_size:,} embedding rows"
        )
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return name, directory, ids


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor, with the file opened for it alone: a handle kept open keeps every page it has
    mapped resident, so reading a 6 GB checkpoint through one handle would hold 6 GB."""
    with safe_open(file, framework="pt") as handle:
        tensor = handle.get_tensor(name)
    if not _all_finite(tensor):
        raise ImportRefused(f"tensor {name!r} in {file.name} contains NaN or infinite values")
    return tensor


def import_published(
    src: str,
    out: str | Path,
    *,
    dtype: str = "bf16",
    add_memory: bool = False,
    revision: str | None = None,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    cache_dir: str | None = None,
    max_gb: float = 16.0,
    tokenizer: str = "auto",
) -> ImportReport:
    """Convert a published-format checkpoint into one of ours at `out`; see the module docstring.

    tokenizer: the vocabulary the model was trained with ("auto": qwen3.5 for the published
    248,320-row vocabulary, none otherwise; "none"; a built-in name or a directory). Its files are
    written beside the weights and its bos/eos/pad ids replace the published config's, which are
    the published class's defaults (1 and 2, ordinary Qwen3.5 tokens), not the tokenizer's."""
    if dtype not in DTYPES:
        raise ImportRefused(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ImportRefused(
            f"{out} exists and is not empty; choose another OUT or pass --force to replace it"
        )
    path = resolve_source(src, revision, cache_dir=cache_dir, max_gb=max_gb)
    raw = read_published_config(path)
    config = published_config(raw, add_memory=add_memory)
    token_source, token_dir, token_ids = _tokenizer_for(tokenizer, config.vocab_size)
    if token_ids:
        for key, value in token_ids.items():
            setattr(config, key, value)
    sources = source_tensors(path)
    plan = plan_import(config, {k: v[1] for k, v in sources.items()})
    for name, (f, _, st_dtype) in sources.items():
        if name not in plan.dropped and st_dtype not in ("F32", "BF16", "F16"):
            raise ImportRefused(f"tensor {name!r} in {f.name} has dtype {st_dtype}, expected floating point")
    added = _new_memory_tensors(config, seed) if add_memory else {}

    out_dtype = DTYPES[dtype]

    def target_dtype(target: str) -> torch.dtype:
        return torch.float32 if target.startswith(_FP32_TARGETS) else out_dtype

    n_params = sum(math.prod(shape) for _, _, _, shape in plan.writes)
    src_params = sum(math.prod(shape) for _, shape, _ in sources.values())
    dropped_params = sum(math.prod(sources[n][1]) for n in plan.dropped)
    report_meta = {
        "source": src,
        "revision": revision,
        "dtype": dtype,
        "add_memory": add_memory,
        "tokenizer": token_source,
        "dropped": dict(plan.dropped_summary()),
    }
    entries = [(t, target_dtype(t), shape) for t, _, _, shape in plan.writes]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        if token_dir is not None:
            for name in TOKENIZER_FILES:
                if (token_dir / name).is_file():
                    shutil.copyfile(token_dir / name, tmp / name)
        writer = SafetensorsStreamWriter(
            tmp / "model.safetensors", entries, {"format": "pt", REPORT_KEY: json.dumps(report_meta)}
        )
        from tqdm import tqdm

        with tqdm(total=len(entries), desc="import", unit="tensor", disable=not progress) as bar:
            for target, src_name, mapped, _shape in plan.writes:
                if src_name is None:
                    tensor = added[target]
                else:
                    tensor = _read_tensor(sources[src_name][0], src_name)
                    if mapped.transform is not _same:
                        tensor = mapped.transform(tensor.float())
                writer.write(target, tensor.to(target_dtype(target)))
                del tensor
                bar.update()
        writer.close()
        fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportReport(
        source=src,
        revision=revision,
        out=out,
        config=config,
        tensors_written=len(entries),
        tensors_added=len(added),
        parameters=n_params,
        source_parameters=src_params,
        dropped=plan.dropped_summary(),
        dropped_parameters=dropped_params,
        tokenizer=token_source,
        token_ids={k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
