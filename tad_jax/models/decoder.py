"""The decoder-only transformer (flax linen) shared by every supported family.

Shape suffixes: b = batch, t = positions, d = hidden size, v = vocabulary, l = layers.

Parameter tree (boxed with logical axes by `init`; `from_pretrained` gives plain arrays):
  embed/embedding [v, d]
  layer_{i}/ (or layers/ with a leading [l] axis when `config.scan_layers`)
    attn_norm, mlp_norm (absent for Phi-2's parallel block), attn_post_norm, mlp_post_norm (Gemma2)
    attn/q,k,v/kernel [d, heads, head_dim] (+ bias), attn/o/kernel [heads, head_dim, d] (+ bias)
    mlp/gate, mlp/up /kernel [d, f], mlp/down/kernel [f, d] (+ biases for Phi-2)
  final_norm/scale (+ bias), lm_head/kernel [d, v] unless the head is tied, lm_head/bias [v]
  when `lm_head_bias` (tied or not: transformers ties only the weight).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tad_jax.models import attention
from tad_jax.models.attention import AttentionMasks
from tad_jax.models.config import REMAT_POLICIES, ModelConfig
from tad_jax.models.layers import Attention, Mlp, Norm, _param, rope_cos_sin

Dtype = jnp.dtype


class DecoderOutput(NamedTuple):
    """What `Decoder.__call__` returns.

    Attributes:
      logits: [B, T, V] float32 (soft-capped when the config says so), or None.
      hidden_states: [B, T, d] after the final norm (what the LM head consumes).
      all_hidden_states: on request, a tuple of L + 1 arrays [B, T, d], as transformers'
        `output_hidden_states`: the (scaled) embeddings, the outputs of layers 1 .. L-1, then the
        final normed hidden states (the last layer's output after the final norm).
    """

    logits: jax.Array | None
    hidden_states: jax.Array
    all_hidden_states: tuple[jax.Array, ...] | None = None


class Block(nn.Module):
    """One transformer layer; returns (x, x or None) so it can be scanned."""

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    return_hidden: bool = False
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x_btd, cos, sin, masks: AttentionMasks, is_sliding):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: Norm(c.traits["norm"], c.norm_eps, name=name, **kw)
        attn = Attention(c, name="attn", impl=self.attention_impl, **kw)
        mlp = Mlp(c, name="mlp", **kw)
        if c.traits["parallel"]:  # Phi-2: one norm feeds both branches
            h = norm("attn_norm")(x_btd)
            x_btd = attn(h, cos, sin, masks, is_sliding) + mlp(h) + x_btd
        else:
            a = attn(norm("attn_norm")(x_btd), cos, sin, masks, is_sliding)
            if c.traits["post_norms"]:
                a = norm("attn_post_norm")(a)
            x_btd = x_btd + a
            m = mlp(norm("mlp_norm")(x_btd))
            if c.traits["post_norms"]:
                m = norm("mlp_post_norm")(m)
            x_btd = x_btd + m
        x_btd = nn.with_logical_constraint(x_btd, ("batch", "seq", "embed"))
        return x_btd, (x_btd if self.return_hidden else None)


def remat_policy(name: str):
    """The `jax.checkpoint_policies` function named `name` (one of `REMAT_POLICIES`)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r}: use one of {list(REMAT_POLICIES)}.")
    return getattr(jax.checkpoint_policies, name)


def positions_from_segments(segment_ids_bt):
    """Position of each token inside its segment (restarting at 0 at each segment start)."""
    t = segment_ids_bt.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids_bt.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_bt[:, :1], bool),
         segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


class Decoder(nn.Module):
    """Decoder-only LM matching transformers' `<Family>ForCausalLM` forward.

    Attributes:
      config: the architecture.
      dtype: compute dtype of activations (attention scores and logits are float32 regardless).
      param_dtype: dtype of freshly initialised parameters.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _layers(self, x, cos, sin, masks, impl, collect):
        c = self.config
        # Unrolled layers know statically whether they slide (argument 5 counting self), so the
        # fused kernels need no lax.cond; the scan passes a traced flag.
        static = () if c.scan_layers else (5,)
        block_cls = Block
        if c.remat:
            block_cls = nn.remat(Block, static_argnums=static, policy=remat_policy(c.remat_policy))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, return_hidden=collect,
                  attention_impl=impl)
        if c.scan_layers:
            scanned = nn.scan(
                block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 3 + (0,), length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            flags = jnp.asarray(c.sliding_layers)
            x, ys = scanned(c, name="layers", **kw)(x, cos, sin, masks, flags)
            return x, (tuple(ys[i] for i in range(c.num_layers)) if collect else ())
        outs = []
        for i in range(c.num_layers):
            x, y = block_cls(c, name=f"layer_{i}", **kw)(
                x, cos, sin, masks, c.sliding_layers[i])
            outs.append(y)
        return x, tuple(outs)

    @nn.compact
    def __call__(self, input_ids_bt, segment_ids=None, positions=None,
                 output_hidden_states=False, return_logits=True) -> DecoderOutput:
        """Runs the model.

        Args:
          input_ids_bt: [B, T] int token ids.
          segment_ids: [B, T] int, 0 = padding; tokens attend causally within their own non-zero
            segment only (packed documents). None: one segment per row.
          positions: [B, T] int RoPE positions. None: position within the segment.
          output_hidden_states: also return every layer's output.
          return_logits: compute the [B, T, V] logits (False: only the hidden states, for the
            fused loss).

        Returns:
          A `DecoderOutput`.
        """
        c = self.config
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids_bt, jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        embed = Embed(c.vocab_size, c.hidden_size, self.param_dtype, name="embed")
        x = embed(input_ids_bt).astype(self.dtype)
        if c.traits["embed_scale"]:  # Gemma: sqrt(d) rounded to the activation dtype, as HF
            x = x * jnp.asarray(c.hidden_size**0.5, dtype=self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        cos, sin = rope_cos_sin(c, positions, self.dtype, segment_ids)
        # Resolved here, where T and the target (the mesh in context) are known.
        impl = attention.resolve_attention(c, attention.target_platform(),
                                           seq_len=input_ids_bt.shape[1], dtype=self.dtype).impl
        masks = attention.attention_masks(c, segment_ids, impl)
        x0 = x
        x, outs = self._layers(x, cos, sin, masks, impl, output_hidden_states)
        h = Norm(c.traits["norm"], c.norm_eps, self.dtype, self.param_dtype, name="final_norm")(x)
        # The head's params exist even when the logits are not computed (the fused loss reads them).
        w_dv, b_v = (None, None)
        if c.lm_head_bias or not c.tie_word_embeddings:
            w_dv, b_v = Head(c.hidden_size, c.vocab_size, c.lm_head_bias, self.param_dtype,
                             use_kernel=not c.tie_word_embeddings, name="lm_head")()
        if c.tie_word_embeddings:
            w_dv = embed.embedding.T
        logits = head_logits(c, h, w_dv, b_v) if return_logits else None
        all_h = (x0, *outs[:-1], h) if output_hidden_states else None
        return DecoderOutput(logits, h, all_h)


class Embed(nn.Module):
    """Token embedding table [V, d]."""

    vocab_size: int
    hidden_size: int
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = _param(self, "embedding", (self.vocab_size, self.hidden_size),
                                ("vocab", "embed"), nn.initializers.normal(1.0), self.param_dtype)

    def __call__(self, ids_bt):
        return jnp.take(self.embedding, ids_bt, axis=0)


class Head(nn.Module):
    """LM head params: returns (kernel [d, V] or None, bias [V] or None); no computation here.

    A tied head has no kernel (the embedding is the weight) but keeps its bias, as transformers'
    Phi does.
    """

    hidden_size: int
    vocab_size: int
    use_bias: bool = False
    param_dtype: Dtype = jnp.float32
    use_kernel: bool = True

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(self.hidden_size**-0.5)
        w = _param(self, "kernel", (self.hidden_size, self.vocab_size), ("embed", "vocab"), init,
                   self.param_dtype) if self.use_kernel else None
        b = _param(self, "bias", (self.vocab_size,), ("vocab",), nn.initializers.zeros,
                   self.param_dtype) if self.use_bias else None
        return w, b


def head_logits(config: ModelConfig, hidden_btd, w_dv, b_v=None):
    """softcap(hidden @ W + b) in float32: the LM head as `lm_head` describes it."""
    acc = jnp.promote_types(jnp.float32, hidden_btd.dtype)  # float32 at least
    logits = jnp.einsum("...d,dv->...v", hidden_btd, w_dv.astype(hidden_btd.dtype),
                        preferred_element_type=acc)
    if b_v is not None:
        logits = logits + b_v.astype(acc)
    if config.final_logit_softcap:
        cap = config.final_logit_softcap
        logits = jnp.tanh(logits / cap) * cap
    return nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))


def lm_head(config: ModelConfig, params) -> tuple[jax.Array, jax.Array | None]:
    """The output head's weights: (W [d, V], bias [V] or None).

    logits = softcap(hidden_states @ W + bias) with `config.final_logit_softcap` (see
    `head_logits`); the fused losses use this instead of materialised logits.

    Args:
      config: the model's config.
      params: the model's params (plain or boxed), without the {"params": ...} wrapper.
    """
    params = unbox(params)
    head = params.get("lm_head", {})
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T, head.get("bias")
    return head["kernel"], head.get("bias")


def unbox(tree):
    """Plain values of (possibly boxed) params.

    Unlike `nn.unbox`, never applies sharding constraints, so it is safe on abstract values and
    outside jit while a mesh is active.
    """
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def init_params(model: Decoder, rng, *, abstract: bool = False):
    """`model.init` params, plain arrays (or ShapeDtypeStructs when `abstract`).

    Runs with no logical-axis rules in scope: activation constraints of the dummy forward pass
    are no-ops even inside a caller's mesh and rules context.
    """
    def init(r):
        with nn.logical_axis_rules(()):
            return model.init(r, jnp.ones((1, 1), jnp.int32))["params"]

    return unbox(jax.eval_shape(init, rng) if abstract else init(rng))
