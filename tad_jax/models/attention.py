"""Attention implementations: plain XLA, query-chunked XLA, Pallas splash (TPU), cuDNN (GPU).

Shape suffixes as in `layers.py`: b = batch, t = query positions, s = key positions, h = query
heads, k = key/value heads, g = h // k, e = head_dim.

Every implementation computes the same thing (`ModelConfig.attention` picks one):
softmax(mask(softcap(q.k * attn_scale))) . v, scores and softmax in float32 at least, where the
mask lets a token see the tokens before it (itself included) of its own segment, and on sliding
layers only the last `sliding_window` of them. They differ in memory:

- `xla`: the [B, H, T, T] scores materialised (today's path);
- `chunked`: query blocks of `attn_query_chunk`, each rematerialised: [B, H, chunk, T] at a time;
- `splash`: the Pallas TPU splash-attention kernel (flash attention with block-sparse masks,
  segment ids, local windows and logit soft-cap): O(T) memory, never the scores;
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash attention on
  NVIDIA GPUs (bf16/fp16; no soft-cap). Packed segments reach it as a boolean [B, 1, T, T] mask.

Padding (segment id 0) is never read by a real token, so its outputs do not matter; they differ
between implementations: the XLA paths attend uniformly over all keys, the fused kernels attend
causally among the padding tokens (a fully masked row would be undefined in them).

Public API:
- `IMPLEMENTATIONS`, `AttentionChoice`, `resolve_attention(cfg, platform, *, seq_len, dtype)`
- `target_platform()`: the platform of the mesh in context (else the default backend)
- `AttentionMasks`, `attention_masks(cfg, segment_ids_bt, impl)`
- `attend(impl, cfg, q_bthe, k_bske, v_bske, masks, is_sliding, dtype) -> [B, T, H, E]`
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tad_jax.models.config import ATTENTION_IMPLEMENTATIONS, ModelConfig

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
_LOG = logging.getLogger(__name__)
_LANES = 128  # splash: block sizes (and so T) must be multiples of the TPU lane width
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


class AttentionChoice(NamedTuple):
    """What `resolve_attention` picked: `impl` (one of "xla", "chunked", "splash", "cudnn") and
    `reason` ("" when the requested or preferred implementation was used)."""

    impl: str
    reason: str = ""


# ---- choosing the implementation ------------------------------------------------------------


def target_platform() -> str:
    """"tpu", "gpu" or "cpu": the platform the traced program is compiled for.

    The mesh in context (`jax.set_mesh`, also inside `jit`) decides, so an ahead-of-time compile
    for a TPU topology on a CPU host resolves to TPU; without a mesh, `jax.default_backend()`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _fallback(cfg: ModelConfig) -> str:
    return "chunked" if cfg.attn_query_chunk else "xla"


def _cudnn_max_head_dim() -> int:
    """256 on Hopper and later (cuDNN's flash-attention limit), 128 before (or when unknown)."""
    try:
        cc = getattr(jax.devices("gpu")[0], "compute_capability", "0")
        return 256 if float(cc) >= 9.0 else 128
    except (RuntimeError, ValueError):
        return 128


def _splash_problem(cfg: ModelConfig, seq_len: int | None) -> str:
    if seq_len is not None and seq_len % _LANES:
        return f"splash needs T to be a multiple of {_LANES}, got T={seq_len}"
    block = cfg.attn_block_size
    if seq_len is not None and block and seq_len % block:
        return f"attn_block_size={block} does not divide T={seq_len}"
    return ""


def _cudnn_problem(cfg: ModelConfig, dtype) -> str:
    if cfg.attn_logit_softcap:
        return "cuDNN flash attention has no attention-logit soft-cap"
    if dtype is not None and jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return ("cuDNN flash attention needs bfloat16/float16, the compute dtype is "
                f"{jnp.dtype(dtype)}")
    hmax = _cudnn_max_head_dim()
    if cfg.head_dim % 8 or cfg.head_dim > hmax:
        return f"cuDNN needs head_dim a multiple of 8 and <= {hmax}, got {cfg.head_dim}"
    return ""


def resolve_attention(cfg: ModelConfig, platform: str, *, seq_len: int | None = None,
                      dtype=None) -> AttentionChoice:
    """The attention implementation `cfg` runs with on `platform`.

    `cfg.attention == "auto"` picks splash on TPU and cuDNN on GPU when the layer's features and
    shapes allow, else `chunked` (if `attn_query_chunk`) or `xla`, logging why once. An explicit
    choice is kept; "splash" (on any platform: interpret mode off TPU) falls back the same way,
    with the same log line, for a T it cannot tile (a multiple of 128 and of `attn_block_size`),
    and "cudnn" is refused where cuDNN cannot run it.

    Args:
      cfg: the model config.
      platform: the target platform, "tpu", "gpu" ("cuda"/"rocm") or "cpu" (see
        `target_platform`; the dry run passes its topology's).
      seq_len: T when known (splash needs a multiple of 128); None skips shape checks.
      dtype: the compute dtype when known (cuDNN needs bfloat16/float16).

    Returns:
      An `AttentionChoice`.

    Raises:
      ValueError: an explicit "cudnn" that cannot run here (the message names the fix).
    """
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    want = cfg.attention
    if want == "cudnn":
        problem = "cuDNN runs on GPU only" if platform != "gpu" else _cudnn_problem(cfg, dtype)
        if problem:
            raise ValueError(f"attention='cudnn': {problem}; use attention='auto' or 'xla'.")
        return AttentionChoice("cudnn")
    if want in ("xla", "chunked"):
        return AttentionChoice(want)
    if want == "splash" or platform == "tpu":
        problem = _splash_problem(cfg, seq_len)
        if problem:  # a shape, not a feature: INFO (the T=8 trace of `init` hits it every run)
            _log_once(f"attention={want!r} on {platform} uses {_fallback(cfg)!r} for T={seq_len}: "
                      f"{problem}.", logging.INFO)
            return AttentionChoice(_fallback(cfg), problem)
        return AttentionChoice("splash")
    elif platform == "gpu":
        problem = _cudnn_problem(cfg, dtype)
        choice = AttentionChoice(_fallback(cfg), problem) if problem else AttentionChoice("cudnn")
    else:  # CPU: the XLA paths are the fast ones
        choice = AttentionChoice(_fallback(cfg))
    if choice.reason:
        _log_once(f"attention={want!r} on {platform} uses {choice.impl!r} for "
                  f"{cfg.model_type}: {choice.reason}.")
    return choice


@functools.cache
def _log_once(message: str, level: int = logging.WARNING) -> None:
    _LOG.log(level, message)


# ---- masks ----------------------------------------------------------------------------------


class AttentionMasks(NamedTuple):
    """What the layers need to mask attention, built once per forward pass.

    Attributes:
      segment_ids_bt: [B, T] int32, 0 = padding (the fused kernels mask from these).
      full_bts: [B, T, T] bool (xla/chunked only): causal, same non-zero segment.
      sliding_bts: [B, T, T] bool (xla/chunked, models with sliding layers): `full_bts` and the
        window. None otherwise.
    """

    segment_ids_bt: jax.Array
    full_bts: jax.Array | None = None
    sliding_bts: jax.Array | None = None


def attention_masks(cfg: ModelConfig, segment_ids_bt, impl: str = "xla") -> AttentionMasks:
    """The masks `impl` needs: dense [B, T, T] booleans for the XLA paths, else segment ids."""
    if impl not in ("xla", "chunked"):
        return AttentionMasks(segment_ids_bt)
    t = segment_ids_bt.shape[1]
    idx = jnp.arange(t)
    causal = idx[:, None] >= idx[None, :]
    same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    mask = causal[None] & same & (segment_ids_bt[:, :, None] != 0)
    if not any(cfg.sliding_layers):
        return AttentionMasks(segment_ids_bt, mask)
    # HF: key index > query index - window (the query and window - 1 keys before it).
    window = (idx[:, None] - idx[None, :]) < cfg.sliding_window
    return AttentionMasks(segment_ids_bt, mask, mask & window[None])


# ---- dispatch --------------------------------------------------------------------------------


def attend(impl: str, cfg: ModelConfig, q_bthe, k_bske, v_bske, masks: AttentionMasks,
           is_sliding, dtype):
    """Attention output [B, T, H, E] in `dtype` with implementation `impl`.

    Args:
      impl: "xla", "chunked", "splash" or "cudnn" (resolved; see `resolve_attention`).
      cfg: the model config (scale, soft-cap, window).
      q_bthe: [B, T, H, E] queries (RoPE applied); k_bske, v_bske: [B, S, K, E].
      masks: from `attention_masks(cfg, segment_ids, impl)`.
      is_sliding: this layer uses the sliding window: a Python bool, or a traced scalar bool
        under `scan_layers` (the fused kernels then switch with `lax.cond`).
      dtype: compute dtype.
    """
    if impl in ("xla", "chunked"):
        mask = masks.full_bts if masks.sliding_bts is None else jnp.where(
            is_sliding, masks.sliding_bts, masks.full_bts)
        return _xla(cfg, q_bthe, k_bske, v_bske, mask, dtype, chunked=impl == "chunked")
    if impl == "splash":
        fn = functools.partial(_splash, cfg, interpret=target_platform() != "tpu", dtype=dtype)
    elif impl == "cudnn":
        fn = functools.partial(_cudnn, cfg, dtype=dtype)
    else:
        raise ValueError(f"Unknown attention implementation {impl!r}; use one of "
                         f"{IMPLEMENTATIONS[1:]}.")
    args = (q_bthe, k_bske, v_bske, masks.segment_ids_bt)
    if cfg.sliding_window is None or is_sliding is False:
        return fn(*args, window=None)
    if is_sliding is True:
        return fn(*args, window=cfg.sliding_window)
    return jax.lax.cond(is_sliding, functools.partial(fn, window=cfg.sliding_window),
                        functools.partial(fn, window=None), *args)


# ---- XLA --------------------------------------------------------------------------------------


def _scores_softmax_v(cfg: ModelConfig, q_btkge, k_bske, v_bske, mask_bts, dtype):
    """softmax(mask(softcap(q.k * scale))) . v, scores and softmax in float32 at least."""
    acc = jnp.promote_types(jnp.float32, dtype)
    scores = jnp.einsum("btkge,bske->bkgts", q_btkge.astype(acc), k_bske.astype(acc))
    scores = scores * cfg.attn_scale
    if cfg.attn_logit_softcap:
        scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bske->btkge", probs, v_bske.astype(dtype))


def _xla(cfg: ModelConfig, q_bthe, k_bske, v_bske, mask_bts, dtype, *, chunked: bool):
    b, t, h, e = q_bthe.shape
    k = k_bske.shape[2]
    q_btkge = q_bthe.reshape(b, t, k, h // k, e)
    attend_ = lambda q_, m_: _scores_softmax_v(cfg, q_, k_bske, v_bske, m_, dtype)
    chunk = cfg.attn_query_chunk
    if chunked and chunk and t > chunk and t % chunk == 0:
        # Query blocks, each rematerialised in the backward pass: [B, H, chunk, T] scores
        # live at a time instead of [B, H, T, T].
        n = t // chunk
        qs = q_btkge.reshape(b, n, chunk, k, h // k, e).swapaxes(0, 1)
        ms = mask_bts.reshape(b, n, chunk, t).swapaxes(0, 1)
        out = jax.lax.map(jax.checkpoint(lambda qm: attend_(*qm)), (qs, ms))
        out = out.swapaxes(0, 1).reshape(b, t, k, h // k, e)
    else:
        out = attend_(q_btkge, mask_bts)
    return out.reshape(b, t, h, e)


# ---- splash (TPU Pallas) ----------------------------------------------------------------------


def splash_block_size(cfg: ModelConfig, seq_len: int) -> int:
    """The splash kernels' block size (queries and keys, forward and backward) for T=seq_len.

    `cfg.attn_block_size` when set; else the largest of 512, 256, 128 that divides T (MaxText's
    default is 512: bigger blocks amortise the per-block overhead, smaller ones skip more of a
    windowed or packed mask).
    """
    if cfg.attn_block_size:
        return cfg.attn_block_size
    return next(bs for bs in (512, 256, _LANES) if seq_len % bs == 0)


def _splash_kernel(cfg: ModelConfig, num_heads: int, seq_len: int, window: int | None,
                   interpret: bool):
    """A splash MHA kernel for one sequence: q [H, T, E], k/v [K, T, E] (GQA when K < H)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bs = splash_block_size(cfg, seq_len)
    blocks = sa.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs,
                           block_kv_dkv=bs, block_kv_dkv_compute=bs, block_q_dq=bs,
                           block_kv_dq=bs)
    shape = (seq_len, seq_len)
    one = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), 0)
    return sa.make_splash_mha(
        sa.MultiHeadMask([one] * num_heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
        attn_logits_soft_cap=cfg.attn_logit_softcap, interpret=interpret)


def _splash(cfg: ModelConfig, q_bthe, k_bske, v_bske, segment_ids_bt, *, window, interpret,
            dtype):
    """Splash attention, sharded with shard_map: batch and heads as the logical rules say."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, h, _ = q_bthe.shape
    # The kernel does not scale: fold attn_scale (incl. query_pre_attn_scalar) into q, in f32.
    acc = jnp.promote_types(jnp.float32, dtype)
    q = (q_bthe.astype(acc) * cfg.attn_scale).astype(dtype).transpose(0, 2, 1, 3)
    k, v = (x.astype(dtype).transpose(0, 2, 1, 3) for x in (k_bske, v_bske))
    seg = segment_ids_bt.astype(jnp.int32)

    def local(q_bhte, k_bkse, v_bkse, seg_bt):
        kernel = _splash_kernel(cfg, q_bhte.shape[1], t, window, interpret)
        one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(s1, s1))
        return jax.vmap(one)(q_bhte, k_bkse, v_bkse, seg_bt)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(q, k, v, seg)
    else:
        batch_axes, head_axes, k, v = _split_over_mesh(mesh, b, h, k, v)
        spec_q = PartitionSpec(batch_axes, head_axes, None, None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec_q, spec_q, spec_q,
                                                        PartitionSpec(batch_axes, None)),
                            out_specs=spec_q, check_vma=False)(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)


def _mesh_axes(logical: str):
    """Mesh axes of a logical axis under the rules in context (None without rules)."""
    spec = nn.logical_to_mesh_axes((logical,))
    return spec[0] if spec else None


def _axes_size(mesh, axes) -> int:
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[n] for n in names)


def _split_over_mesh(mesh, b: int, h: int, k_bkse, v_bkse):
    """(batch axes, head axes, k, v) for shard_map: batch over the `batch` rule's axes and heads
    over the `heads` rule's, each only when the size divides. KV heads stay unrepeated when they
    split too; otherwise each is repeated the fewest times that lets them split with the queries.
    """
    batch_axes, head_axes = _mesh_axes("batch"), _mesh_axes("heads")
    if b % _axes_size(mesh, batch_axes):
        batch_axes = None
    n = _axes_size(mesh, head_axes)
    kh = k_bkse.shape[1]
    if h % n:
        return batch_axes, None, k_bkse, v_bkse
    if kh % n:
        r = next(r for r in range(1, h // kh + 1) if (kh * r) % n == 0 and h % (kh * r) == 0)
        k_bkse, v_bkse = (jnp.repeat(x, r, axis=1) for x in (k_bkse, v_bkse))
    return batch_axes, head_axes, k_bkse, v_bkse


# ---- cuDNN (GPU) ------------------------------------------------------------------------------


def _cudnn(cfg: ModelConfig, q_bthe, k_bske, v_bske, segment_ids_bt, *, window, dtype,
           implementation: str = "cudnn"):
    """`jax.nn.dot_product_attention` with cuDNN: causal, windowed, GQA without repeating K/V.

    Segments reach cuDNN as a boolean [B, 1, T, T] same-segment mask (cuDNN turns it into an
    additive bias: B * T^2 elements, shared by all heads). `implementation="xla"` runs the same
    call through XLA (how the CPU tests check that the call is well-formed).
    """
    seg = segment_ids_bt
    same_bts = seg[:, :, None] == seg[:, None, :]
    return jax.nn.dot_product_attention(
        q_bthe.astype(dtype), k_bske.astype(dtype), v_bske.astype(dtype),
        mask=same_bts[:, None], scale=cfg.attn_scale, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)


__all__ = ["AttentionChoice", "AttentionMasks", "IMPLEMENTATIONS", "attend", "attention_masks",
           "resolve_attention", "splash_block_size", "target_platform"]
