"""HF `config.json` <-> `ModelConfig` fields, per family.

Reads both the legacy keys (`rope_theta`, `rope_scaling`) and transformers 5's `rope_parameters`;
writes the legacy keys, which transformers 4.x and 5.x both read.
"""

from __future__ import annotations

from typing import Any

from tad_jax.models.config import _ARCHITECTURES, _freeze, check_model_type, default_head_dim

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu")
_ROPE_META_KEYS = ("rope_theta", "partial_rotary_factor", "type")


def _rope_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """rope_theta, rope_scaling items and partial_rotary_factor from either key style."""
    default_partial = 0.5 if model_type == "phi" else 1.0  # PhiConfig's own default
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else None
    scaling = dict(params if params is not None else (hf.get("rope_scaling") or {}))
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi3Config's own renaming of the legacy names
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}. "
            "Remove or change 'rope_scaling' in config.json."
        )
    items = None
    if rope_type != "default":
        kept = {k: v for k, v in scaling.items() if k not in _ROPE_META_KEYS}
        kept["rope_type"] = rope_type
        if model_type == "phi3":  # Phi-3 keeps it at the top level (see original_max_... field)
            kept.pop("original_max_position_embeddings", None)
        items = _freeze(kept)
    return dict(rope_theta=float(theta), rope_scaling=items, partial_rotary_factor=float(partial))


def _bias_fields(hf: dict[str, Any], model_type: str) -> dict[str, bool]:
    if model_type == "qwen2":
        return dict(qkv_bias=True, o_bias=False, mlp_bias=False, lm_head_bias=False)
    if model_type == "phi":
        return dict(qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True)
    attn = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=attn, o_bias=attn, mlp_bias=bool(hf.get("mlp_bias", False)),
                lm_head_bias=False)


def _window_fields(hf: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """sliding_window and layer_types as the family's HF code interprets them."""
    if model_type == "gemma2":
        window = hf.get("sliding_window", 4096)
        types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
        ]
    elif model_type == "qwen2":
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
        types = hf.get("layer_types") or [
            "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28)
            else "full_attention" for i in range(num_layers)
        ]
    elif model_type == "phi3":  # one window for every layer when set
        window = hf.get("sliding_window")
        types = ["sliding_attention"] * num_layers if window is not None else None
    else:
        window, types = None, None
    if window is None or types is None or "sliding_attention" not in types:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=int(window), layer_types=tuple(types))


def fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """`ModelConfig` keyword arguments from an HF config dict (see `ModelConfig.from_hf`)."""
    model_type = hf.get("model_type")
    check_model_type(model_type)
    try:
        d, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
        fields = dict(
            model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=d,
            intermediate_size=hf["intermediate_size"], num_layers=layers, num_heads=heads,
        )
    except KeyError as e:
        raise ValueError(
            f"config.json lacks the required key {e}; is it a causal-LM config?") from e
    fields["num_kv_heads"] = hf.get("num_key_value_heads") or heads
    fields["head_dim"] = hf.get("head_dim") or default_head_dim(d, heads)
    fields["max_position_embeddings"] = hf.get("max_position_embeddings", 2048)
    eps_key = "layer_norm_eps" if model_type == "phi" else "rms_norm_eps"
    fields["norm_eps"] = float(hf.get(eps_key, 1e-5 if model_type in ("phi", "phi3") else 1e-6))
    fields.update(_rope_fields(hf, model_type))
    fields.update(_bias_fields(hf, model_type))
    fields.update(_window_fields(hf, model_type, layers))
    act_key = "hidden_activation" if model_type == "gemma2" else "hidden_act"
    act = hf.get(act_key) or hf.get("hidden_act") or {"gemma2": "gelu_pytorch_tanh",
                                                       "phi": "gelu_new"}.get(model_type, "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}")
    fields["hidden_act"] = act
    fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", model_type == "gemma2"))
    if model_type == "gemma2":
        fields["final_logit_softcap"] = hf.get("final_logit_softcapping", 30.0)
        fields["attn_logit_softcap"] = hf.get("attn_logit_softcapping", 50.0)
        fields["query_pre_attn_scalar"] = hf.get("query_pre_attn_scalar", 256)
    if model_type == "phi3":
        scaling = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        fields["original_max_position_embeddings"] = hf.get(
            "original_max_position_embeddings",
            scaling.get("original_max_position_embeddings", fields["max_position_embeddings"]))
    eos = hf.get("eos_token_id")
    fields.update(bos_token_id=hf.get("bos_token_id"), pad_token_id=hf.get("pad_token_id"),
                  eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
    return fields


def _family_to_hf(cfg: Any) -> dict[str, Any]:
    """The keys that differ between families."""
    mt, out = cfg.model_type, {}
    if mt == "phi":
        out.update(layer_norm_eps=cfg.norm_eps, qk_layernorm=False,
                   partial_rotary_factor=cfg.partial_rotary_factor)
    else:
        out["rms_norm_eps"] = cfg.norm_eps
    if mt in ("llama", "gemma2"):
        if cfg.qkv_bias != cfg.o_bias:
            raise ValueError(f"{mt} has one attention_bias flag: qkv_bias and o_bias must agree.")
        out["attention_bias"] = cfg.qkv_bias
    if mt == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if mt == "gemma2":
        out.update(hidden_activation=cfg.hidden_act,
                   query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                   final_logit_softcapping=cfg.final_logit_softcap,
                   attn_logit_softcapping=cfg.attn_logit_softcap,
                   sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types or ()))
    if mt == "qwen2":
        out.update(use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window,
                   layer_types=list(cfg.layer_types or ["full_attention"] * cfg.num_layers))
    if mt == "phi3":
        out.update(original_max_position_embeddings=cfg.original_max_position_embeddings,
                   sliding_window=cfg.sliding_window)
        if cfg.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = cfg.partial_rotary_factor
    return out


def fields_to_hf(cfg: Any) -> dict[str, Any]:
    """The HF config dict of `cfg` (see `ModelConfig.to_hf`)."""
    if cfg.model_type in ("phi", "phi3") and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError(f"{cfg.model_type} needs head_dim * num_heads == hidden_size in HF.")
    eos = cfg.eos_token_id
    out = dict(
        model_type=cfg.model_type, architectures=[_ARCHITECTURES[cfg.model_type]],
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act, rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling_dict, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
        eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
    )
    out.update(_family_to_hf(cfg))
    return out
