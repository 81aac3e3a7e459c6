"""Architecture description shared by the decoder, the HF conversion and the presets.

One frozen `ModelConfig` describes every supported family (`llama`, `qwen2`, `gemma2`, `phi`,
`phi3`). The family decides the fixed structural traits (norm kind, parallel block, fused
projections, ...) through `FAMILY_TRAITS`; the numeric fields come from an HF `config.json`
(`ModelConfig.from_hf`) and go back to one (`ModelConfig.to_hf`).

The config is hashable (tuples, not lists or dicts) so it can be a linen module attribute and a
static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma2", "phi", "phi3")

# `ModelConfig.attention` values (tad_jax.models.attention implements them).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "splash", "cudnn")

# `ModelConfig.remat_policy` values: what a rematerialised layer keeps from its forward pass
# (`jax.checkpoint_policies` of the same names; tad_jax.models.decoder applies them).
#   nothing_saveable: keep only the layer's input; the backward pass reruns the whole forward.
#   dots_with_no_batch_dims_saveable: also keep the outputs of matmuls without batch dimensions
#     (the q/k/v/o and MLP projections, not the attention scores): no projection is recomputed.
#   dots_saveable: also keep every matmul output, batched ones (attention scores) included.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")

# Structural traits fixed by the family (not stored in config.json).
#   norm: "rms" (x * w), "rms1p" (x * (1 + w), Gemma) or "layer" (LayerNorm with bias, Phi-2).
#   parallel: attention and MLP read the same normed input and add to one residual (Phi-2).
#   post_norms: extra norms after attention and after the MLP (Gemma2 "sandwich").
#   embed_scale: multiply the embeddings by sqrt(d) (Gemma).
#   fused: q/k/v and gate/up stored fused in the checkpoint (Phi-3).
#   gated_mlp: gate * up (SwiGLU/GeGLU) or a plain fc1 -> act -> fc2 (Phi-2).
FAMILY_TRAITS: dict[str, dict[str, Any]] = {
    "llama": dict(norm="rms", parallel=False, post_norms=False, embed_scale=False, gated_mlp=True),
    "qwen2": dict(norm="rms", parallel=False, post_norms=False, embed_scale=False, gated_mlp=True),
    "gemma2": dict(norm="rms1p", parallel=False, post_norms=True, embed_scale=True, gated_mlp=True),
    "phi": dict(norm="layer", parallel=True, post_norms=False, embed_scale=False, gated_mlp=False),
    "phi3": dict(norm="rms", parallel=False, post_norms=False, embed_scale=False, gated_mlp=True),
}

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi": "PhiForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def check_model_type(model_type: str) -> None:
    """Raises a ValueError naming the supported families if `model_type` is not one of them."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported model_type {model_type!r}: tad_jax supports "
            f"{list(SUPPORTED_MODEL_TYPES)}. "
            "Pick a checkpoint of one of these families (config.json 'model_type')."
        )


def _freeze(value: Any) -> Any:
    """Turns lists/dicts (from JSON) into tuples so the config stays hashable."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of `_freeze` for the rope-scaling items: tuples of numbers become lists."""
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only architecture (any supported family).

    Attributes:
      model_type: HF family name, one of `SUPPORTED_MODEL_TYPES`.
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim:
        sizes (d = hidden_size, F = intermediate_size, H = num_heads, K = num_kv_heads).
      max_position_embeddings: the context length the config declares (rope scaling uses it).
      norm_eps: epsilon of every norm (rms_norm_eps or layer_norm_eps).
      rope_theta: RoPE base.
      rope_scaling: None, or the HF rope-scaling items (sorted (key, value) pairs, `rope_type`
        included; lists as tuples), e.g. llama3 or longrope.
      partial_rotary_factor: fraction of each head that is rotated (Phi-2: 0.4).
      original_max_position_embeddings: Phi-3's pretraining length (longrope); None elsewhere.
      qkv_bias, o_bias, mlp_bias, lm_head_bias: which projections carry a bias.
      tie_word_embeddings: the LM head is the transposed embedding.
      hidden_act: HF activation name ("silu", "gelu_pytorch_tanh", "gelu_new").
      final_logit_softcap: None or c: logits = c * tanh(logits / c) (Gemma2).
      attn_logit_softcap: the same on attention scores (Gemma2).
      query_pre_attn_scalar: scores scaled by its -1/2 power instead of head_dim's (Gemma2).
      sliding_window: window of the "sliding_attention" layers (None: no sliding layers).
      layer_types: per layer "full_attention" or "sliding_attention" (None: all full).
      bos_token_id, eos_token_id, pad_token_id: carried through to config.json.
      attention: "auto" (splash on TPU, cuDNN on GPU when the layer allows, else the XLA
        paths), "xla" ([B, H, T, T] scores), "chunked" (query blocks of `attn_query_chunk`),
        "splash" (Pallas TPU kernel; interpret mode elsewhere) or "cudnn" (GPU); see
        `tad_jax.models.attention.resolve_attention`.
      attn_query_chunk: None, or compute attention in blocks of this many queries (each block
        rematerialised), bounding the score memory to [B, H, chunk, T]; used when it divides T
        (by "chunked", and by "auto" when it falls back to XLA).
      attn_block_size: splash block size (queries and keys, a multiple of 128 dividing T);
        None = chosen per T (`attention.splash_block_size`).
      remat: rematerialise each layer in the backward pass (`nn.remat`).
      remat_policy: what a rematerialised layer saves, one of `REMAT_POLICIES` (the
        `jax.checkpoint_policies` of that name); ignored when `remat` is False.
      scan_layers: scan one layer over a stacked `layers` axis (`nn.scan`) instead of unrolling.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    attention: str = "auto"
    attn_query_chunk: int | None = None
    attn_block_size: int | None = None
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False

    def __post_init__(self):
        check_model_type(self.model_type)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}: "
                "grouped-query attention needs num_kv_heads to divide num_heads."
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but "
                f"num_layers={self.num_layers}: "
                "give one 'full_attention'/'sliding_attention' per layer."
            )
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: use one of "
                             f"{list(ATTENTION_IMPLEMENTATIONS)}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: use one of "
                             f"{list(REMAT_POLICIES)}.")
        if self.attention == "chunked" and not self.attn_query_chunk:
            raise ValueError("attention='chunked' needs attn_query_chunk (queries per block), "
                             "e.g. attn_query_chunk=512.")
        if self.attn_block_size is not None and (
                self.attn_block_size <= 0 or self.attn_block_size % 128):
            raise ValueError(f"attn_block_size={self.attn_block_size} must be a positive "
                             "multiple of 128 (the TPU lane width), or None to choose per T.")
        if self.rope_dim % 2:
            raise ValueError(
                f"The rotary dimension {self.rope_dim} (head_dim * partial_rotary_factor) "
                "must be even."
            )

    # ---- derived properties -------------------------------------------------------------------
    @property
    def traits(self) -> dict[str, Any]:
        """The family's structural traits (`FAMILY_TRAITS`)."""
        return FAMILY_TRAITS[self.model_type]

    @property
    def rope_dim(self) -> int:
        """Number of rotated channels per head."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """`rope_scaling` as a plain dict (lists for the longrope factors)."""
        if self.rope_scaling is None:
            return None
        return {k: _thaw(v) for k, v in self.rope_scaling}

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window?"""
        if self.layer_types is None or self.sliding_window is None:
            return (False,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def attn_scale(self) -> float:
        """Multiplier of q.k scores."""
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Builds a config from an HF `config.json` dict (legacy or transformers-5 rope keys).

        Args:
          hf: the parsed config.json.
          **overrides: fields to set afterwards (e.g. `remat=True`, `scan_layers=True`).

        Returns:
          The `ModelConfig`.

        Raises:
          ValueError: unsupported `model_type` or inconsistent sizes.
        """
        from tad_jax.models._hf_config import fields_from_hf

        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {unknown}; valid: "
                             f"{sorted(cls.__dataclass_fields__)}.")
        return cls(**{**fields_from_hf(hf), **overrides})

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict that transformers loads into the same architecture."""
        from tad_jax.models._hf_config import fields_to_hf

        return fields_to_hf(self)

    def num_params(self) -> int:
        """Parameter count (embeddings and head included), computed from the sizes alone."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        h, k = self.num_heads, self.num_kv_heads
        attn = d * hd * (h + 2 * k) + h * hd * d
        attn += (h + 2 * k) * hd * self.qkv_bias + d * self.o_bias
        mlp = (3 if self.traits["gated_mlp"] else 2) * d * f
        mlp += ((2 * f if self.traits["gated_mlp"] else f) + d) * self.mlp_bias
        norm_size = 2 * d if self.traits["norm"] == "layer" else d
        per_layer = (1 if self.traits["parallel"] else 2) * (2 if self.traits["post_norms"] else 1)
        norms = norm_size * per_layer
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        head += self.vocab_size * self.lm_head_bias
        return embed + head + norm_size + self.num_layers * (attn + mlp + norms)


def default_head_dim(hidden_size: int, num_heads: int) -> int:
    """hidden_size // num_heads, checked to divide (HF's default when head_dim is absent)."""
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; give head_dim "
            "explicitly or pick a head count that divides the hidden size."
        )
    return hidden_size // num_heads


__all__ = ["ATTENTION_IMPLEMENTATIONS", "FAMILY_TRAITS", "ModelConfig", "REMAT_POLICIES",
           "SUPPORTED_MODEL_TYPES", "check_model_type"]
