"""The tensor names and shapes a checkpoint in the published silx-ai Quasar format holds, for any
published configuration: what the published modeling code registers, written down independently of
our importer's mapping table (and checked against the tiny fixture, which that code produced), so
that a full-size dummy can be built on the meta device without the 6 GB checkpoint."""

from __future__ import annotations

from typing import Any

from quasar.importer import PUBLISHED_DEFAULTS


def published_tensor_shapes(raw: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    c = {**PUBLISHED_DEFAULTS, **raw}
    d, H, D, V = c["d_model"], c["n_heads"], c["head_dim"], c["vocab_size"]
    m, E = c["memory_dim"], c["num_routed_experts"]
    cycle = ["quasar"] * c["quasar_layers"] + ["gla"] * c["gated_layers"]
    kinds = [cycle[i % len(cycle)] for i in range(c["n_layers"])]
    latent = int(d * c["bigmac_r"])
    hidden = int(c["routed_expert_size"] / c["bigmac_r"])
    gk, gv = int(d * c["expand_k"]), int(d * c["expand_v"])
    n_moe = sum(1 for i in range(c["n_layers"]) if i >= c["dense_input_layers"])

    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (V, d),
        "model.embed_norm.weight": (d,),
        "model.norm.weight": (d,),
        "lm_head.weight": (V, d),
        "model.all_moe_bias": (n_moe, E),
        "model.all_moe_momentum": (n_moe, E),
        "model.all_moe_max_vio": (n_moe,),
    }
    for i, kind in enumerate(kinds):
        p = f"model.layers.{i}."
        out[p + "injection_gate"] = (1,)
        for norm in ("ln1", "ln1_out", "ln2", "ln2_out"):
            out[f"{p}{norm}.weight"] = (d,)
        a = p + "attn."
        if kind == "quasar":
            for x in "qkv":
                out[f"{a}{x}_proj.weight"] = (H * D, d)
                out[f"{a}{x}_conv1d.weight"] = (H * D, 1, c["conv_size"])
            out[a + "beta_log"] = (H,)
            out[a + "g_proj.0.weight"] = (D, d)
            out[a + "g_proj.1.weight"] = (H * D, D)
            out[a + "g_proj.1.bias"] = (H * D,)
            out[a + "o_norm.weight"] = (D,)
            out[a + "o_proj.weight"] = (d, H * D)
        else:
            out[a + "q_proj.weight"] = (gk, d)
            out[a + "k_proj.weight"] = (gk, d)
            out[a + "v_proj.weight"] = (gv, d)
            out[a + "g_proj.weight"] = (gv, d)
            out[a + "gk_proj.0.weight"] = (16, d)
            out[a + "gk_proj.1.weight"] = (gk, 16)
            out[a + "gk_proj.1.bias"] = (gk,)
            out[a + "g_norm_swish_gate.weight"] = (gv // H,)
            out[a + "o_proj.weight"] = (d, gv)
            mem = p + "memory."
            out.update(
                {
                    mem + "W_eta.weight": (1, d),
                    mem + "W_eta.bias": (1,),
                    mem + "summary_query": (1, 1, m),
                    mem + "summary_proj.weight": (m, d),
                    mem + "summary_proj.bias": (m,),
                    mem + "eta_channels": (1, 1, m),
                    mem + "temperature": (1,),
                    mem + "input_norm.weight": (d,),
                    mem + "input_norm.bias": (d,),
                    mem + "compress_z.0.weight": (2 * m, d),
                    mem + "compress_z.2.weight": (m, 2 * m),
                    mem + "W_qkv_mem.weight": (3 * m, d),
                    p + "W_alpha.weight": (1, d),
                    p + "W_alpha.bias": (1,),
                    p + "C_to_hidden.weight": (d, m),
                }
            )
        f = p + "ffn."
        if i < c["dense_input_layers"]:
            out[f + "gate.weight"] = (c["d_ff"], d)
            out[f + "up.weight"] = (c["d_ff"], d)
            out[f + "down.weight"] = (d, c["d_ff"])
        else:
            s = c["shared_expert_size"]
            out.update(
                {
                    f + "router.router_weights": (E, d),
                    f + "w_down_proj.weight": (latent, d),
                    f + "w_up_proj.weight": (d, latent),
                    f + "experts_w12": (E, latent, 2 * hidden),
                    f + "experts_w3": (E, hidden, latent),
                    f + "max_vio": (),
                }
            )
            for e in range(c["num_shared_experts"]):
                out[f"{f}shared_experts.{e}.gate.weight"] = (s, d)
                out[f"{f}shared_experts.{e}.up.weight"] = (s, d)
                out[f"{f}shared_experts.{e}.down.weight"] = (d, s)
    return out
