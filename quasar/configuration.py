"""QuasarConfig: every hyper-parameter of the student, validated, with named presets."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from quasar.errors import CheckpointError

LAYER_KINDS = {"Q": "quasar", "G": "gla"}
POSITION_MODES = ("rope", "none")
ROUTER_MIXINGS = ("sigmoid", "softmax")

# Keys transformers itself writes into (or passes through) a config.json; everything else in a
# config.json must be a QuasarConfig field.
_TRANSFORMERS_KEYS = frozenset(
    {
        "_name_or_path", "name_or_path", "_commit_hash", "_attn_implementation_autoset",
        "architectures", "transformers_version", "model_type", "dtype", "torch_dtype",
        "attn_implementation", "experts_implementation", "num_labels", "id2label", "label2id",
        "output_attentions", "output_hidden_states", "return_dict", "problem_type",
        "is_encoder_decoder", "chunk_size_feed_forward",
    }
)  # fmt: skip

# Fields only the published silx-ai configuration class has: a config.json with these is in the
# published format, which our classes must not load as if it were ours (`import-published` converts it).
PUBLISHED_FORMAT_KEYS = frozenset(
    {"d_model", "n_layers", "n_heads", "d_ff", "quasar_layers", "gated_layers", "hybrid_layer_types",
     "moe_type", "num_routed_experts", "routed_expert_size", "shared_expert_size", "bigmac_r",
     "dense_input_layers", "use_gla_first"}
)  # fmt: skip


class ConfigFieldError(CheckpointError):
    """A config.json (or keyword) that is not a QuasarConfig: unknown fields, or the published format."""


class QuasarConfig(PretrainedConfig):
    """Configuration of the Quasar student (looped hybrid of Quasar attention, GLA, latent memory, SMEBU MoE).

    The body has `num_hidden_layers` blocks whose kinds cycle through `layer_pattern`
    ("Q" = Quasar attention + latent memory, "G" = gated linear attention). The body runs
    `num_loops` times with the same weights. The first `dense_layers` blocks use a dense
    SwiGLU FFN, the rest a SMEBU mixture of experts (when `num_experts > 0`).

    Options that let the model reproduce the published Quasar-3B-A1B exactly (`published-3b-a1b`
    preset, `python -m quasar import-published`); the defaults are ours for new models:

    - `position_mode`: "rope" applies RoPE (theta `rope_theta`) to q and k of the Quasar blocks;
      "none" applies no positions at all (DroPE). The published code computes RoPE and never applies
      it, so the published model is "none".
    - `data_dependent_beta`: the EFLA step beta = softplus(per-head bias + a linear function of the
      token) when True; False leaves beta one learned constant per head, as published.
    - `quasar_attention_scale`: o_t = scale * S_t^T q_t in Quasar attention; None means
      head_dim^-1/2 (ours), the published layer uses 1.0.
    - `use_memory`: the causal latent memory in every Quasar block. The published memory (on the GLA
      layers) writes the whole sequence before it reads, so every token reads the future; it is
      never imported, and a published model is "no memory" (or ours added with a closed read).
    - `router_mixing`: how the chosen experts' outputs are weighted. "sigmoid" (ours): the chosen
      experts' sigmoid scores, normalised to sum 1; "softmax" (published): a softmax over the chosen
      experts' raw router logits. Either way the SMEBU bias only chooses, it never weighs.
    - `gla_norm_eps`: epsilon of the GLA output RMSNorm; None means `rms_norm_eps`. The published
      GLA layer keeps its library default of 1e-5 while every other norm uses 1e-6.
    - `residual_scale`: the branch scale r of every block (published 0.1).
    """

    model_type = "quasar"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 248_320,
        hidden_size: int = 1536,
        num_hidden_layers: int = 24,
        layer_pattern: str = "QQQQGG",
        num_loops: int = 1,
        # Quasar attention (EFLA)
        num_heads: int = 12,
        head_dim: int = 128,
        conv_size: int = 4,
        beta_init_min: float = 1.0,
        beta_init_max: float = 16.0,
        data_dependent_beta: bool = True,
        output_gate_rank: int = 128,
        quasar_attention_scale: float | None = None,
        # GLA
        gla_num_heads: int | None = None,
        gla_expand_k: float = 0.5,
        gla_expand_v: float = 1.0,
        gla_gate_rank: int = 16,
        gla_gate_logit_normalizer: float = 16.0,
        gla_norm_eps: float | None = None,
        # latent memory (inside each Quasar block)
        use_memory: bool = True,
        memory_slots: int = 128,
        memory_dim: int = 128,
        memory_segment_size: int = 64,
        memory_write_rate_init: float = 0.1,
        memory_read_gate_bias_init: float = -6.0,
        # feed-forward
        dense_layers: int = 4,
        intermediate_size: int = 4096,
        num_experts: int = 64,
        num_experts_per_tok: int = 4,
        expert_intermediate_size: int = 1024,
        moe_latent_size: int | None = 384,
        shared_expert_intermediate_size: int = 3072,
        # SMEBU router-bias balancing
        smebu_kappa: float = 2.0,
        smebu_lambda: float = 2e-3,
        smebu_beta: float = 0.5,
        router_bias_clamp: float = 10.0,
        router_mixing: str = "sigmoid",
        # loop and injection
        use_looped_injection: bool = False,
        looped_injection_init: float = 0.1,
        scale_injection_grad: bool = True,
        # positions, norms, init
        position_mode: str = "rope",
        rope_theta: float = 1_000_000.0,
        max_position_embeddings: int = 16_384,
        residual_scale: float = 0.1,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        attention_backend: str = "auto",
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ):
        _refuse_foreign_fields(kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_pattern = layer_pattern
        self.num_loops = num_loops
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.conv_size = conv_size
        self.beta_init_min = beta_init_min
        self.beta_init_max = beta_init_max
        self.data_dependent_beta = data_dependent_beta
        self.output_gate_rank = output_gate_rank
        self.quasar_attention_scale = quasar_attention_scale
        self.gla_num_heads = num_heads if gla_num_heads is None else gla_num_heads
        self.gla_expand_k = gla_expand_k
        self.gla_expand_v = gla_expand_v
        self.gla_gate_rank = gla_gate_rank
        self.gla_gate_logit_normalizer = gla_gate_logit_normalizer
        self.gla_norm_eps = gla_norm_eps
        self.use_memory = use_memory
        self.memory_slots = memory_slots
        self.memory_dim = memory_dim
        self.memory_segment_size = memory_segment_size
        self.memory_write_rate_init = memory_write_rate_init
        self.memory_read_gate_bias_init = memory_read_gate_bias_init
        self.dense_layers = dense_layers
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_intermediate_size = expert_intermediate_size
        self.moe_latent_size = moe_latent_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.smebu_kappa = smebu_kappa
        self.smebu_lambda = smebu_lambda
        self.smebu_beta = smebu_beta
        self.router_bias_clamp = router_bias_clamp
        self.router_mixing = router_mixing
        self.use_looped_injection = use_looped_injection
        self.looped_injection_init = looped_injection_init
        self.scale_injection_grad = scale_injection_grad
        self.position_mode = position_mode
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.residual_scale = residual_scale
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention_backend = attention_backend
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_fields()

    # ---- derived shapes -------------------------------------------------------------------------

    @property
    def block_kinds(self) -> list[str]:
        """Kind of each block of the body ("quasar" or "gla"), cycling through `layer_pattern`."""
        return [
            LAYER_KINDS[self.layer_pattern[i % len(self.layer_pattern)]]
            for i in range(self.num_hidden_layers)
        ]

    @property
    def moe_block_indices(self) -> list[int]:
        """Body blocks with a SMEBU MoE FFN (all after the first `dense_layers`), in order."""
        if self.num_experts == 0:
            return []
        return list(range(self.dense_layers, self.num_hidden_layers))

    @property
    def gla_output_norm_eps(self) -> float:
        return self.rms_norm_eps if self.gla_norm_eps is None else self.gla_norm_eps

    @property
    def gla_key_dim(self) -> int:
        return int(self.hidden_size * self.gla_expand_k) // self.gla_num_heads

    @property
    def gla_value_dim(self) -> int:
        return int(self.hidden_size * self.gla_expand_v) // self.gla_num_heads

    # ---- validation -----------------------------------------------------------------------------

    def validate_fields(self) -> None:
        """Raise ValueError naming the first field that cannot describe a working model."""

        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"QuasarConfig.{field}={getattr(self, field)!r}: {why}")

        need(self.vocab_size > 0, "vocab_size", "must be positive")
        need(self.hidden_size > 0, "hidden_size", "must be positive")
        need(self.num_hidden_layers > 0, "num_hidden_layers", "must be positive")
        need(
            len(self.layer_pattern) > 0 and set(self.layer_pattern) <= set(LAYER_KINDS),
            "layer_pattern",
            "must be a non-empty string of 'Q' (Quasar block) and 'G' (GLA block)",
        )
        need(self.num_loops >= 1, "num_loops", "must be at least 1")
        need(self.num_heads > 0 and self.head_dim > 0, "num_heads", "num_heads and head_dim must be positive")
        need(self.conv_size >= 1, "conv_size", "must be at least 1")
        need(
            0 < self.beta_init_min <= self.beta_init_max,
            "beta_init_min",
            "need 0 < beta_init_min <= beta_init_max",
        )
        need(self.gla_num_heads > 0, "gla_num_heads", "must be positive")
        need(
            self.gla_key_dim > 0
            and self.gla_key_dim * self.gla_num_heads == int(self.hidden_size * self.gla_expand_k),
            "gla_expand_k",
            "hidden_size * gla_expand_k must be a positive multiple of gla_num_heads",
        )
        need(
            self.gla_value_dim > 0
            and self.gla_value_dim * self.gla_num_heads == int(self.hidden_size * self.gla_expand_v),
            "gla_expand_v",
            "hidden_size * gla_expand_v must be a positive multiple of gla_num_heads",
        )
        need(self.gla_gate_logit_normalizer > 0, "gla_gate_logit_normalizer", "must be positive")
        need(
            self.gla_norm_eps is None or self.gla_norm_eps > 0,
            "gla_norm_eps",
            "must be positive or None (rms_norm_eps)",
        )
        need(
            self.quasar_attention_scale is None or self.quasar_attention_scale > 0,
            "quasar_attention_scale",
            "must be positive or None (head_dim^-1/2)",
        )
        if self.use_memory:
            need(self.memory_slots > 0, "memory_slots", "must be positive")
            need(self.memory_dim > 0, "memory_dim", "must be positive")
            need(self.memory_segment_size > 0, "memory_segment_size", "must be positive")
            need(0 < self.memory_write_rate_init < 1, "memory_write_rate_init", "must be in (0, 1)")
        need(
            0 <= self.dense_layers <= self.num_hidden_layers,
            "dense_layers",
            "must be in [0, num_hidden_layers]",
        )
        need(self.num_experts >= 0, "num_experts", "must be >= 0 (0 = dense FFN everywhere)")
        if self.num_experts > 0:
            need(
                1 <= self.num_experts_per_tok <= self.num_experts,
                "num_experts_per_tok",
                f"must be in [1, num_experts={self.num_experts}]",
            )
            need(self.expert_intermediate_size > 0, "expert_intermediate_size", "must be positive")
            need(
                self.moe_latent_size is None or self.moe_latent_size > 0,
                "moe_latent_size",
                "must be positive or None (experts act on the hidden size)",
            )
            need(self.shared_expert_intermediate_size >= 0, "shared_expert_intermediate_size", "must be >= 0")
        if self.dense_layers > 0 or self.num_experts == 0:
            need(self.intermediate_size > 0, "intermediate_size", "must be positive")
        need(self.smebu_kappa > 0, "smebu_kappa", "must be positive")
        need(self.smebu_lambda >= 0, "smebu_lambda", "must be >= 0")
        need(0 <= self.smebu_beta < 1, "smebu_beta", "must be in [0, 1)")
        need(self.router_bias_clamp > 0, "router_bias_clamp", "must be positive")
        need(self.router_mixing in ROUTER_MIXINGS, "router_mixing", f"must be one of {ROUTER_MIXINGS}")
        need(0 < self.looped_injection_init < 1, "looped_injection_init", "must be in (0, 1)")
        need(self.position_mode in POSITION_MODES, "position_mode", f"must be one of {POSITION_MODES}")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(self.position_mode == "none" or self.head_dim % 2 == 0, "head_dim", "must be even for RoPE")
        need(self.residual_scale > 0, "residual_scale", "must be positive")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(
            self.attention_backend in ("auto", "triton", "torch", "naive"),
            "attention_backend",
            "unknown backend",
        )

    # ---- presets --------------------------------------------------------------------------------

    @classmethod
    def for_tokenizer(cls, preset: str, tokenizer_size: int, **overrides: Any) -> QuasarConfig:
        """A preset whose vocabulary holds every token of a tokenizer: the preset's own rows when they
        suffice (real vocabularies are padded: Qwen3.5's 248,077 tokens in 248,320 rows), else exactly
        the tokenizer's size."""
        rows = cls.from_preset(preset).vocab_size
        return cls.from_preset(preset, **{"vocab_size": max(rows, tokenizer_size), **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> QuasarConfig:
        """A named configuration: "tiny" (unit tests), "small" (CPU experiments), "3b-a1b" (the published
        shape, our architecture), "published-3b-a1b" (the published model as imported)."""
        if name not in PRESETS:
            raise ValueError(f"unknown Quasar preset {name!r}; available: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _refuse_foreign_fields(kwargs: dict[str, Any]) -> None:
    """Keyword arguments beyond our fields must be ones transformers itself uses; a published-format
    config.json gets told how to convert it instead of silently becoming a default model."""
    published = sorted(PUBLISHED_FORMAT_KEYS & set(kwargs))
    if published:
        raise ConfigFieldError(
            f"this is a configuration in the published silx-ai Quasar format (fields {', '.join(published[:4])}"
            f"{', ...' if len(published) > 4 else ''}), which QuasarConfig does not read: convert the checkpoint "
            "once with `python -m quasar import-published SRC OUT` and load OUT"
        )
    unknown = sorted(k for k in kwargs if k not in _TRANSFORMERS_KEYS)
    if unknown:
        raise ConfigFieldError(
            f"QuasarConfig has no field(s) {', '.join(map(repr, unknown))}: remove them from the config, "
            "or check the spelling against quasar/configuration.py"
        )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        layer_pattern="QG",
        num_loops=2,
        use_looped_injection=True,
        num_heads=2,
        head_dim=32,
        output_gate_rank=16,
        gla_num_heads=2,
        gla_gate_rank=8,
        memory_slots=16,
        memory_dim=32,
        memory_segment_size=16,
        dense_layers=1,
        intermediate_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        expert_intermediate_size=64,
        moe_latent_size=None,
        shared_expert_intermediate_size=64,
        max_position_embeddings=4096,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=384,
        num_hidden_layers=6,
        layer_pattern="QQG",
        num_loops=2,
        use_looped_injection=True,
        num_heads=6,
        head_dim=64,
        output_gate_rank=64,
        gla_num_heads=6,
        memory_slots=64,
        memory_dim=64,
        memory_segment_size=64,
        dense_layers=2,
        intermediate_size=1024,
        num_experts=8,
        num_experts_per_tok=2,
        expert_intermediate_size=512,
        moe_latent_size=None,
        shared_expert_intermediate_size=512,
        max_position_embeddings=16_384,
    ),
    # The published Quasar-3B-A1B shape (reference.md section 1.1), with our choices for a new model
    # (RoPE, data-dependent beta, causal memory, normalised sigmoid mixing, D^-1/2 output scale).
    "3b-a1b": dict(),
    # Exactly what `import-published` makes of silx-ai/Quasar-3B-A1B-Preview: the published shape
    # and forward pass (no positions, constant beta per head, output scale 1, no memory, softmax
    # mixing, GLA norm eps 1e-5). 2,890,518,720 parameters: the published checkpoint's 2,901,843,184
    # less its non-causal memory (8 x 1,415,555) and its 24 injection gates, which are not imported.
    "published-3b-a1b": dict(
        data_dependent_beta=False,
        quasar_attention_scale=1.0,
        gla_norm_eps=1e-5,
        use_memory=False,
        router_mixing="softmax",
        position_mode="none",
    ),
}
