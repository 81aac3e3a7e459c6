"""Building blocks of the decoder: norms, RoPE, attention, MLP (flax linen).

The attention arithmetic itself (XLA, chunked, splash, cuDNN) lives in `attention.py`.

Shape suffixes: b = batch, t = query positions, s = key positions, d = hidden size, h = query
heads, k = key/value heads, g = query heads per kv head (h = k * g), e = head_dim, f = MLP size.
Parameters are created with logical axis names (`nn.with_logical_partitioning`); activations are
constrained with `nn.with_logical_constraint` (a no-op without a mesh and rules).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tad_jax.models.attention import AttentionMasks, attend
from tad_jax.models.config import ModelConfig

Dtype = jnp.dtype


def _param(mod: nn.Module, name: str, shape, axes, init, dtype):
    return mod.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def activation(name: str):
    """The HF activation `name` as a jax function."""
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu_pytorch_tanh", "gelu_new"):  # both are the tanh approximation
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"Unknown activation {name!r}")


class Norm(nn.Module):
    """RMSNorm (x * w or Gemma's x * (1 + w)) or LayerNorm, computed in float32 like HF."""

    kind: str  # "rms", "rms1p" or "layer"
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        d = x_btd.shape[-1]
        init = nn.initializers.zeros if self.kind == "rms1p" else nn.initializers.ones
        scale = _param(self, "scale", (d,), ("embed",), init, self.param_dtype)
        acc = jnp.promote_types(jnp.float32, self.dtype)  # float32 at least, like HF
        x = x_btd.astype(acc)
        if self.kind == "layer":
            bias = _param(self, "bias", (d,), ("embed",), nn.initializers.zeros, self.param_dtype)
            mean = x.mean(-1, keepdims=True)
            var = jnp.square(x - mean).mean(-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + self.eps)
            return (y * scale.astype(acc) + bias.astype(acc)).astype(self.dtype)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        if self.kind == "rms1p":  # Gemma multiplies in float32, then casts
            return (y * (1.0 + scale.astype(acc))).astype(self.dtype)
        # Llama casts back to the input dtype before the weight multiply
        return scale.astype(self.dtype) * y.astype(self.dtype)


# ---- RoPE ----------------------------------------------------------------------------------


def _theta_pow(theta: float, dim: int) -> np.ndarray:
    """theta ** (2i / dim) rounded once to float32, as torch's float32 pow does (numpy's float32
    power is off by an ulp in some entries, enough to move deep models' logits by ~1e-4)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return np.float32(1.0) / _theta_pow(theta, dim)


def _llama3_inv_freq(inv: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray | None, int, float]:
    """Inverse frequencies of the config's RoPE (HF's `ROPE_INIT_FUNCTIONS`, in numpy).

    Returns:
      (inv_freq, long_inv_freq or None, switch_len, attention_factor): LongRoPE uses
      `long_inv_freq` when max(position) + 1 > switch_len, as HF does per forward call.
    """
    dim, s = cfg.rope_dim, cfg.rope_scaling_dict
    kind = s["rope_type"] if s else "default"
    if kind == "longrope":
        orig = cfg.original_max_position_embeddings or s["original_max_position_embeddings"]
        factor = s.get("factor") or cfg.max_position_embeddings / orig
        attn_factor = s.get("attention_factor")
        if attn_factor is None:
            attn_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        base = _theta_pow(cfg.rope_theta, dim)
        short = np.float32(1.0) / (np.asarray(s["short_factor"], np.float32) * base)
        long = np.float32(1.0) / (np.asarray(s["long_factor"], np.float32) * base)
        return short, long, int(orig), float(attn_factor)
    inv = _base_inv_freq(cfg.rope_theta, dim)
    if kind == "linear":
        inv = (inv / s["factor"]).astype(np.float32)
    elif kind == "llama3":
        inv = _llama3_inv_freq(inv, s)
    return inv, None, 0, 1.0


def _segment_max(values_bt, segment_ids_bt):
    """Per token: the max of `values` over the tokens of its own segment (same row)."""
    same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return jnp.max(jnp.where(same, values_bt[:, None, :], jnp.iinfo(jnp.int32).min), axis=-1)


def rope_cos_sin(cfg: ModelConfig, positions_bt, dtype, segment_ids_bt=None):
    """cos, sin [B, T, rope_dim] for the given positions (float32 inside, like HF).

    LongRoPE switches to its long factors when a sequence reaches past the pretraining length.
    HF decides once per batch (max position + 1 of the whole batch); we decide per packed
    segment, so a document's logits do not depend on what else is in the batch or on padding.
    For one unpadded sequence per batch the two agree.
    """
    inv, long_inv, switch_len, attn_factor = rope_tables(cfg)
    inv_e = jnp.asarray(inv)
    if long_inv is not None:
        if segment_ids_bt is None:
            segment_ids_bt = jnp.zeros_like(positions_bt)
        seq_len_bt = _segment_max(positions_bt.astype(jnp.int32), segment_ids_bt) + 1
        inv_e = jnp.where((seq_len_bt > switch_len)[..., None], jnp.asarray(long_inv), inv_e)
    acc = jnp.promote_types(jnp.float32, dtype)
    freqs = positions_bt[..., None].astype(acc) * inv_e.astype(acc)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * attn_factor).astype(dtype), (jnp.sin(emb) * attn_factor).astype(dtype)


def apply_rope(x_bthe, cos_bte, sin_bte):
    """Rotates the first rope_dim channels of each head (HF's rotate_half convention)."""
    rot = cos_bte.shape[-1]
    x_rot, x_pass = x_bthe[..., :rot], x_bthe[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_rot * cos_bte[:, :, None] + rotated * sin_bte[:, :, None]
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# ---- attention and MLP ---------------------------------------------------------------------


class Projection(nn.Module):
    """x @ kernel (+ bias), kernel of any rank: in_axes of x contracted with the kernel's first."""

    shape: tuple[int, ...]  # kernel shape
    axes: tuple[str, ...]
    n_in: int = 1  # how many leading kernel dims contract with x's trailing dims
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = int(np.prod(self.shape[: self.n_in]))
        init = nn.initializers.normal(stddev=fan_in**-0.5)
        kernel = _param(self, "kernel", self.shape, self.axes, init, self.param_dtype)
        contract = tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                (contract, ((), ())))
        if self.use_bias:
            bias = _param(self, "bias", self.shape[self.n_in :], self.axes[self.n_in :],
                          nn.initializers.zeros, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    """Grouped-query attention with RoPE, segment/causal/sliding masks, optional score soft-cap.

    `impl` is the resolved implementation (`attention.resolve_attention`); `masks` come from
    `attention.attention_masks(cfg, segment_ids, impl)`.
    """

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"

    def _proj(self, name, shape, axes, n_in, bias):
        return Projection(shape, axes, n_in, bias, self.dtype, self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x_btd, cos, sin, masks: AttentionMasks, is_sliding):
        c = self.cfg
        d, h, k, e = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        q = self._proj("q", (d, h, e), ("embed", "heads", "head_dim"), 1, c.qkv_bias)(x_btd)
        kk = self._proj("k", (d, k, e), ("embed", "kv_heads", "head_dim"), 1, c.qkv_bias)(x_btd)
        v = self._proj("v", (d, k, e), ("embed", "kv_heads", "head_dim"), 1, c.qkv_bias)(x_btd)
        q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "head_dim"))
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        out = attend(self.impl, c, q, kk, v, masks, is_sliding, self.dtype)
        out = nn.with_logical_constraint(out, ("batch", "seq", "heads", "head_dim"))
        return self._proj("o", (h, e, d), ("heads", "head_dim", "embed"), 2, c.o_bias)(out)


class Mlp(nn.Module):
    """Gated (act(x W_gate) * x W_up) W_down, or Phi-2's act(x W_up + b) W_down + b."""

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        c = self.cfg
        d, f, act = c.hidden_size, c.intermediate_size, activation(c.hidden_act)
        dense = lambda name, shape, axes: Projection(
            shape, axes, 1, c.mlp_bias, self.dtype, self.param_dtype, name=name)
        up = dense("up", (d, f), ("embed", "mlp"))(x_btd)
        if c.traits["gated_mlp"]:
            hidden = act(dense("gate", (d, f), ("embed", "mlp"))(x_btd)) * up
        else:
            hidden = act(up)
        hidden = nn.with_logical_constraint(hidden, ("batch", "seq", "mlp"))
        return dense("down", (f, d), ("mlp", "embed"))(hidden)
