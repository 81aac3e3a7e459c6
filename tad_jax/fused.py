"""Distillation losses fused with the output heads, in token chunks: no [N, V] tensor ever exists.

`fused_distillation_loss` (and its one-term forms `fused_tad_loss`, `fused_kl_loss`,
`fused_causal_lm_loss`) take final hidden states and output heads instead of logits and equal
`tad_jax.losses` applied to `softcap(h @ W + b)`, in value and in gradient. Each `lax.scan` step
makes about `chunk_size` tokens' logits and calls the one TAD kernel (`tad_core.token_terms` and
`token_grad`, Eq. 6) on them; the gradient w.r.t. the logits is pushed through the head inside the
step (dW += h^T dz, dh = dz W^T), so the backward pass only scales it (or, for reduction "none",
runs the scan again).

β(X) is exact (TAD_SPEC.md, per row or per segment): when every step holds whole rows
(T <= chunk_size) it comes from the step itself; otherwise a teacher pre-pass computes log α_T of
every position first (one more teacher head matmul, over vocabulary blocks: the teacher head is
read once). The chunk layouts: `tad_jax.chunks`; costs and measurements: docs/fused_loss.md.

Shape suffixes: r = rows (the flattened leading axes), t = positions of a row, n = chunks,
a = rows per chunk, c = positions of a row per chunk, m = a·c tokens of one chunk,
d = hidden size, v = vocabulary, k = top-K.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from tad_jax import checks, chunks, losses
from tad_jax import tad_core as core

_F32 = jnp.float32
_DIVERGENCES = ("tad", "kl")
# Unroll factor of the chunk scans. Benchmarks set it to True: XLA's cost analysis counts a loop
# body once, so FLOPs and bytes of the whole loss need the loop unrolled.
_UNROLL = 1


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static settings of one fused loss (hashable: a `custom_vjp` non-differentiable argument)."""

    divergence: str | None  # "tad", "kl" or None (CLM only)
    clm: bool
    tad: core.TADConfig  # K, β, τ, eps_alpha, β scope (K = 0 and β = 1 for "kl")
    chunk_size: int
    softcap: float | None
    reduction: str
    head_grad: bool = True  # False: no dW (a frozen head, e.g. tied to frozen embeddings)


# ----------------------------------------------------------------------------- argument checks


def _check_inputs(cfg: _Config, hs, ws, bs, ht, wt, bt, mask, targets, seg) -> _Config:
    """Checks the arguments (`tad_jax.checks`); returns cfg with the soft-cap a float."""
    size = cfg.chunk_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 (tokens per step), got {size!r}")
    checks.reduction(cfg.reduction)
    vocab, positions = checks.head("student", hs, ws, bs), hs.shape[:-1]
    if cfg.divergence is not None and (ht is None or wt is None):
        raise ValueError(f"divergence={cfg.divergence!r} needs teacher_hidden and teacher_head "
                         "(got None); pass both, or divergence=None for the CLM term alone")
    if cfg.divergence is None and targets is None:
        raise ValueError("nothing to compute: divergence=None and targets=None; pass the next-"
                         "token targets (int [..., T]) for the CLM term, or a divergence")
    if ht is not None:
        if checks.head("teacher", ht, wt, bt) != vocab:
            raise ValueError(
                f"the heads disagree on the vocabulary: student {ws.shape} vs teacher {wt.shape}. "
                "Slice the larger head (and its bias) to the shared vocabulary, "
                "head[:, :V_shared]; or, if the student's head is the smaller one, pad it with "
                "zero columns and a student_bias of -inf on them (such entries are dropped from "
                "both distributions)"
            )
        if ht.shape[:-1] != positions:
            raise ValueError(
                f"teacher_hidden {ht.shape} and student_hidden {hs.shape} must share [..., T]")
    checks.per_position("mask", mask, positions)
    checks.per_position("targets", targets, positions)
    if targets is not None:
        checks.ids("targets", targets, "token ids")
    if cfg.divergence == "tad":
        cfg.tad.check_vocab(vocab)
        if cfg.tad.beta_scope == "segment":
            checks.segments(seg, positions)
    cap = cfg.softcap
    if cap is not None:
        cap = checks.positive("final_logit_softcap (None for no cap)", cap)
    return dataclasses.replace(cfg, softcap=cap)


# ----------------------------------------------------------------------------- mask


def _mask_rt(mask, rows: int, t: int):
    """The validity mask as float32 0/1 [R, T]; any non-zero entry counts (as in `losses`)."""
    if mask is None:
        return jnp.ones((rows, t), _F32)
    return (mask.reshape(rows, t) != 0).astype(_F32)


# ----------------------------------------------------------------------------- per-chunk math


def _logits(h_md, w_dv, b_v, softcap):
    """Soft-capped logits [m, V] in float32 and the soft-cap's derivative (None without cap)."""
    dt = jnp.result_type(h_md.dtype, w_dv.dtype)
    z = jnp.einsum("md,dv->mv", h_md.astype(dt), w_dv.astype(dt), preferred_element_type=_F32)
    if b_v is not None:
        z = z + b_v.astype(_F32)
    if softcap is None:
        return z, None
    tz = jnp.tanh(z / softcap)
    return softcap * tz, 1.0 - tz * tz


def _gamma(log_at_rt, mask_rt, seg_rt, cfg: _Config):
    """β(X) − 1 per position [R, T] (0 for plain KL)."""
    if cfg.divergence == "kl":
        return jnp.zeros_like(log_at_rt)
    return core.beta_x(log_at_rt, mask_rt, cfg.tad, seg_rt) - 1.0


def _clm_terms(zs_mv, y_m):
    """Cross-entropy per token and its gradient w.r.t. the (untempered) student logits."""
    logp = core.log_softmax(zs_mv)
    onehot = jnp.arange(zs_mv.shape[-1]) == y_m[..., None]
    # A target outside [0, V) adds 0 (`core.at_targets`), so its gradient is 0 too (as that of
    # `losses.causal_lm_loss`), not softmax − a one-hot of nothing.
    valid = ((y_m >= 0) & (y_m < zs_mv.shape[-1]))[..., None]
    return -core.at_targets(logp, y_m), jnp.where(valid, jnp.exp(logp) - onehot, 0.0)


def _chunk(cfg: _Config, params, xs, rows: int, want_grad: bool):
    """One scan step on m tokens: per-token losses [m] and, if wanted, dz of raw logits [m, V].

    γ = β(X) − 1 comes from `xs["gamma"]` (pre-pass) or from the chunk itself (whole rows).
    """
    ws, bs, wt, bt = params
    zs, dcap = _logits(xs["hs"], ws, bs, cfg.softcap)
    out, dz = {}, jnp.zeros_like(zs)
    w = xs.get("w")
    if cfg.divergence is not None:
        tau = cfg.tad.temperature
        # Student -inf entries are only those of a -inf bias, merged into bt by `_run`.
        a, b = core.tempered_pair(zs, _logits(xs["ht"], wt, bt, cfg.softcap)[0], tau, merge=False)
        head, terms = core.head_and_terms(a, b, cfg.tad.top_k, from_matmul=True)
        gamma = xs.get("gamma")
        if gamma is None:  # the chunk holds whole rows
            seg = xs.get("seg")
            gamma = _gamma(terms.log_alpha_t.reshape(rows, -1), xs["mask"].reshape(rows, -1),
                           None if seg is None else seg.reshape(rows, -1), cfg).reshape(-1)
        # τ² · (D_KL1 + β(X) α_T D_KL2)
        tail = jnp.exp(terms.log_alpha_t) * terms.kl2
        out["div"] = tau * tau * (terms.kl1 + (1.0 + gamma) * tail)
        if want_grad:  # τ² · ∂/∂(z/τ) · 1/τ
            dz = dz + (tau * w)[:, None] * core.token_grad(a, b, head, terms, gamma)
    if cfg.clm:
        out["clm"], g_clm = _clm_terms(zs, xs["targets"])
        if want_grad:
            dz = dz + w[:, None] * g_clm
    if want_grad:
        # where, not a product: a weight-0 (masked) position must not pass on a NaN or inf.
        dz = jnp.where(w[:, None] != 0, dz if dcap is None else dz * dcap, 0.0)
    return out, dz


# ----------------------------------------------------------------------------- scans


def _prepare(cfg: _Config, hs, ht, mask, targets, seg):
    """The hidden states as blocks [a, n, c, d], per-token inputs as chunks [n, m], the mask."""
    t = hs.shape[-2]
    rows = math.prod(hs.shape[:-2])
    lay = chunks.layout(rows, t, cfg.chunk_size)
    mask_rt = _mask_rt(mask, rows, t)
    big = {"hs": chunks.blocks(lay, hs.reshape(rows, t, -1))}
    if ht is not None:
        big["ht"] = chunks.blocks(lay, ht.reshape(rows, t, -1))
    small = {"i": jnp.arange(lay.n), "mask": chunks.to_chunks(lay, mask_rt)}
    if targets is not None:
        small["targets"] = chunks.to_chunks(lay, targets.reshape(rows, t).astype(jnp.int32))
    seg_rt = None
    if seg is not None and cfg.tad.beta_scope == "segment":
        seg_rt = seg.reshape(rows, t).astype(jnp.int32)
        small["seg"] = chunks.to_chunks(lay, seg_rt)
    return lay, big, small, mask_rt, seg_rt


def _vocab_block(tokens: int, vocab: int, chunk_size: int, k: int) -> int:
    """Columns per vocabulary block of the pre-pass: tokens·Vb ≈ chunk_size·V, the logits memory
    of one main-pass chunk; blocks of near-equal size, more than K (a block's top-(K+1)). When
    they do not divide V, a multiple of 128 (TPU lanes) for the larger ones: the last block then
    overlaps the previous one, masked (on XLA CPU that costs ~20% of the pre-pass at V = 32000,
    N = 2048, blocks of 4096 vs 4000: measured)."""
    nb = -(-vocab // max(chunk_size * vocab // tokens, k + 1))
    vb = max(-(-vocab // nb), k + 1)
    if vocab % vb and vb > 128:
        vb = -(-vb // 128) * 128
    return min(vocab, vb)


def _teacher_tail(cfg: _Config, wt, bt, ht_nd, block: int):
    """log α_T [N] of every position and the teacher's head (`core.Head`, None for K = 0), from
    one read of the teacher head: a scan over vocabulary blocks of `block` columns.

    Position chunks would each re-read the whole [d_t, V] head (1.8 GB in bf16 at d_t = 3584,
    V = 256000, per 512 tokens); here the blocks of the head are read once and the [N, d_t]
    hidden states once per block. Each position keeps, over the blocks seen so far, the
    logsumexp of all its logits, its exact top-K (values, indices) and the logsumexp of the rest
    (the tail, fed by a block's entries outside the block's top-K and by those the merge drops),
    so log α_T = lse_tail − lse without 1 − Σ_I p (cancellation). The merge takes `core.top_k`
    of [running, block's top-K]: the running entries have the lower vocabulary indices, so
    listing them first keeps the lowest-index tie rule; the head equals `core.top_k` over V.
    The last block starts at V − block when block does not divide V; its columns seen before
    are -inf (no mass, never displacing an entry of the running top-K).
    """
    k, tau, vocab = cfg.tad.top_k, cfg.tad.temperature, wt.shape[1]
    n_blocks = -(-vocab // block)
    if k == 0:  # the tail is the whole vocabulary
        return jnp.zeros(ht_nd.shape[0], _F32), None

    def step(state, i):
        lse, lse_tail, vals_k, idx_k = state
        start = jnp.minimum(i * block, vocab - block)
        w = jax.lax.dynamic_slice_in_dim(wt, start, block, axis=1)
        bias = None if bt is None else jax.lax.dynamic_slice_in_dim(bt, start, block)
        b_v, _ = _logits(ht_nd, w, bias, cfg.softcap)
        if tau != 1.0:
            b_v = b_v / tau
        if vocab % block:
            b_v = jnp.where(start + jnp.arange(block) >= i * block, b_v, -jnp.inf)
        # Top-(K+1): its first value is the block's maximum and its last the maximum of the
        # block's tail, the shifts of the two logsumexps, which then share one pass over b (the
        # masked maximum of `core.logsumexp` would be a third). `core.top_k` keeps XLA TPU's
        # TopK a TopK although its values are sliced apart here (its barrier).
        top_v, top_i = core.top_k(b_v, k + 1)
        head = core.head_of(top_v[..., :k], top_i[..., :k])
        m, m_tail = core.finite_shift(top_v[..., 0]), core.finite_shift(top_v[..., k])
        lse_b = jnp.log(jnp.sum(jnp.exp(b_v - m[..., None]), -1)) + m
        tail_b = jnp.log(jnp.sum(jnp.where(core.in_tail(b_v, head),
                                           jnp.exp(b_v - m_tail[..., None]), 0.0), -1)) + m_tail
        cand_v = jnp.concatenate([vals_k, top_v[..., :k]], -1)
        cand_i = jnp.concatenate([idx_k, start + head.idx_k], -1)
        vals_k, pos_k = core.top_k(cand_v, k)
        dropped = core.logsumexp(cand_v, core.in_tail(cand_v, core.head_of(vals_k, pos_k)))
        return (jnp.logaddexp(lse, lse_b), jnp.logaddexp(lse_tail, jnp.logaddexp(tail_b, dropped)),
                vals_k, jnp.take_along_axis(cand_i, pos_k, -1))

    n = ht_nd.shape[0]
    none = jnp.full(n, -jnp.inf, _F32)
    # Block 0 seeds the running top-K (an empty one merges as the identity), so it never holds
    # placeholder entries.
    state = step((none, none, jnp.zeros((n, 0), _F32), jnp.zeros((n, 0), jnp.int32)), 0)
    if n_blocks > 1:
        blocks = jnp.arange(1, n_blocks, dtype=jnp.int32)  # int32 under jax_enable_x64 too
        state, _ = jax.lax.scan(lambda s, i: (step(s, i), None), state, blocks, unroll=_UNROLL)
    lse, lse_tail, vals_k, idx_k = state
    # A position with no teacher entry left (all -inf) has α_T = 0 (`tad_core`), not
    # exp(-inf − (-inf)) = NaN, which would make β(X) of its whole row NaN.
    log_at = core.log_share(lse_tail, lse)
    return log_at, core.head_of(vals_k, idx_k)


def _pre_pass(cfg: _Config, params, ht, mask_rt, seg_rt):
    """γ = β(X) − 1 of every position [R, T] when rows span chunks, from one pass over the
    teacher head (`_teacher_tail`)."""
    rows, t = mask_rt.shape
    ht_nd = ht.reshape(rows * t, ht.shape[-1])
    block = _vocab_block(rows * t, params[2].shape[1], cfg.chunk_size, cfg.tad.top_k)
    log_at, _ = _teacher_tail(cfg, params[2], params[3], ht_nd, block)
    return _gamma(log_at.reshape(rows, t), mask_rt, seg_rt, cfg)


def _main_pass(cfg: _Config, params, big, small, want_grad: bool):
    """Scans the chunks: per-token losses [n, m] and, if wanted, (dW, db, dh [a, n, c, d])."""
    ws = params[0]
    rows = big["hs"].shape[0]  # rows per step
    carry0 = ()
    if want_grad:  # float32 accumulators; dh is written in place, chunk by chunk
        carry0 = (jnp.zeros(ws.shape if cfg.head_grad else (), _F32),
                  jnp.zeros(ws.shape[1], _F32), jnp.zeros(big["hs"].shape, _F32))

    def body(carry, xs_c):
        i = xs_c["i"]
        xs_c = dict(xs_c, **{k: chunks.take(v, i) for k, v in big.items()})
        out, dz = _chunk(cfg, params, xs_c, rows, want_grad)
        if not want_grad:
            return carry, out
        dw, db, dh = carry
        if cfg.head_grad:  # skipped for a frozen head: a third of the student's head FLOPs
            hs = xs_c["hs"].astype(_F32)
            dw = dw + jnp.einsum("md,mv->dv", hs, dz, preferred_element_type=_F32)
        dh_md = jnp.einsum("mv,dv->md", dz, ws.astype(_F32), preferred_element_type=_F32)
        dh = jax.lax.dynamic_update_index_in_dim(dh, dh_md.reshape(rows, -1, dh.shape[-1]), i,
                                                 axis=1)
        return (dw, db + dz.sum(0), dh), out

    return jax.lax.scan(body, carry0, small, unroll=_UNROLL)


def _run(cfg: _Config, params, hs, ht, mask, targets, seg, weights_rt, want_grad: bool):
    """Per-token losses [R, T] and, if wanted, the gradients (dh, dW, db), in float32."""
    lay, big, small, mask_rt, seg_rt = _prepare(cfg, hs, ht, mask, targets, seg)
    ws, bs, wt, bt = params
    if cfg.divergence is not None and bs is not None and cfg.softcap is None:
        # A -inf student bias (a padded column) drops the entry from both distributions, as
        # `tad_core.tempered_pair` does (with a soft-cap no logit is -inf).
        bt = jnp.where(jnp.isneginf(bs), -jnp.inf, 0.0 if bt is None else bt.astype(_F32))
        params = (ws, bs, wt, bt)
    if cfg.divergence == "kl":
        small["gamma"] = jnp.zeros(small["mask"].shape, _F32)
    elif cfg.divergence == "tad" and lay.n > 1 and not lay.by_rows:  # rows span chunks
        small["gamma"] = chunks.to_chunks(lay, _pre_pass(cfg, params, ht, mask_rt, seg_rt))
    if want_grad:
        small["w"] = chunks.to_chunks(lay, weights_rt)
    grads, out = _main_pass(cfg, params, big, small, want_grad)
    # where, not multiply: a masked position may hold inf (e.g. a -inf target logit).
    per_tok = {k: jnp.where(mask_rt > 0, chunks.from_chunks(lay, v), 0.0) for k, v in out.items()}
    if want_grad:
        dw, db, dh = grads
        grads = (chunks.unblock(lay, dh).reshape(hs.shape[:-1] + (-1,)), dw, db)
    return per_tok, mask_rt, grads


# ----------------------------------------------------------------------------- custom_vjp


def _outputs(cfg: _Config, per_tok, mask_rt, lead_shape):
    parts = {k: losses._reduce(v.reshape(lead_shape), mask_rt, cfg.reduction)
             for k, v in per_tok.items()}
    return sum(parts.values()), parts


def _weights(cfg: _Config, mask, hs):
    """Per-token gradient weights for "sum"/"mean": the mask over the global valid count."""
    rows, t = math.prod(hs.shape[:-2]), hs.shape[-2]
    m = _mask_rt(mask, rows, t)
    return m / jnp.maximum(m.sum(), 1.0) if cfg.reduction == "mean" else m


def _dtypes_like(*arrays):
    """Shape/dtype stand-ins of arrays (residuals must be jax types, so zero-size arrays)."""
    return tuple(None if a is None else jnp.zeros((0,) * a.ndim, a.dtype) for a in arrays)


def _cast_grads(grads, hs, ws, bs):
    dh, dw, db = grads
    return (
        dh.astype(hs.dtype),
        dw.astype(ws.dtype) if dw.ndim else None,
        None if bs is None else db.astype(bs.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: _Config, hs, ws, bs, ht, wt, bt, mask, targets, seg):
    per_tok, mask_rt, _ = _run(cfg, (ws, bs, wt, bt), hs, ht, mask, targets, seg, None, False)
    return _outputs(cfg, per_tok, mask_rt, hs.shape[:-1])


def _fused_fwd(cfg: _Config, hs, ws, bs, ht, wt, bt, mask, targets, seg):
    params = (ws, bs, wt, bt)
    if cfg.reduction == "none":  # per-token cotangent: the backward pass runs the scan again
        per_tok, mask_rt, _ = _run(cfg, params, hs, ht, mask, targets, seg, None, False)
        res = (params, hs, ht, mask, targets, seg)
    else:  # scalar cotangent: the gradient is computed now and only scaled later
        w_rt = _weights(cfg, mask, hs)
        per_tok, mask_rt, grads = _run(cfg, params, hs, ht, mask, targets, seg, w_rt, True)
        # float32 residuals, cast once after scaling (casting twice would round bf16 twice).
        res = (grads, _dtypes_like(hs, ws, bs))
    return _outputs(cfg, per_tok, mask_rt, hs.shape[:-1]), res


def _fused_bwd(cfg: _Config, res, cts):
    # Only the total carries a gradient: the public functions stop the gradient of the parts.
    ct = cts[0]
    if cfg.reduction == "none":
        params, hs, ht, mask, targets, seg = res
        rows = math.prod(hs.shape[:-2])
        w_rt = ct.reshape(rows, hs.shape[-2]).astype(_F32)
        w_rt = w_rt * _mask_rt(mask, *w_rt.shape)
        _, _, grads = _run(cfg, params, hs, ht, mask, targets, seg, w_rt, True)
        dh, dw, db = _cast_grads(grads, hs, params[0], params[1])
    else:
        (dh, dw, db), like = res
        dh, dw, db = _cast_grads((ct * dh, ct * dw, ct * db), *like)
    # Zero cotangents for the teacher (a constant of the loss), the mask, targets and segments.
    return dh, dw, db, None, None, None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------- public API


def fused_distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head, targets,
                            mask=None, *, divergence="tad", top_k=10, beta=2.0, temperature=1.0,
                            eps_alpha=1e-6, beta_scope="row", segment_ids=None, chunk_size=1024,
                            student_bias=None, teacher_bias=None, final_logit_softcap=None,
                            reduction="mean", student_head_grad=True, config=None):
    """Eq. 4, L_CLM + L_DIV, in one chunked pass: each chunk's student logits serve both terms.

    Equals `losses.distillation_loss(softcap(h_s W_s + b_s), softcap(h_t W_t + b_t), targets, mask,
    ...)` (without the cosine term) in value and in its gradients w.r.t. the student's hidden
    states, head and bias, with the exact β(X) of TAD_SPEC.md even when a row spans chunks.
    Computed in float32 whatever the inputs' dtype (float64 too); gradients in the inputs'.

    Args:
        student_hidden: final student hidden states [..., T, d_s] (after the last norm).
        student_head: student output head [d_s, V] (a tied embedding table transposed).
        teacher_hidden: final teacher hidden states [..., T, d_t]; a constant (zero cotangent).
        teacher_head: teacher output head [d_t, V]; a constant (zero cotangent).
        targets: int next-token ids [..., T], or None for the divergence alone.
        mask: [..., T], 1 where the position counts; None means all positions count.
        divergence: "tad", "kl" (vanilla KD), or None (CLM alone).
        top_k, beta, temperature, eps_alpha, beta_scope: TAD's settings (`tad_core.TADConfig`);
            τ applies to the divergence only, which is multiplied by τ².
        segment_ids: int [..., T], the document of each position (beta_scope "segment").
        chunk_size: tokens per scan step (summed over the rows; each step takes whole rows when
            T <= chunk_size, else max(1, chunk_size // rows) positions of every row). Peak memory
            ~ chunk_size × V floats. With TAD, T <= chunk_size also saves the teacher pre-pass
            that β(X) needs when rows span chunks (one more teacher head matmul, d_t·V
            multiply-adds per token: fused TAD costs 1.34x fused KL's FLOPs at Gemma2 sizes,
            against 1.00x with whole rows; docs/fused_loss.md).
        student_bias, teacher_bias: optional [V] biases of the heads (a -inf student bias drops
            the entry from both distributions: a padded vocabulary).
        final_logit_softcap: Gemma2's soft-cap c (logits = c·tanh(logits / c), before τ), or None.
        reduction: "none" ([..., T], 0 at masked positions), "sum", or "mean" (over the valid
            positions of the whole batch).
        student_head_grad: False for a frozen head: its gradient is not computed (zero cotangent),
            saving d·V FLOPs per token and a [d, V] float32 accumulator.
        config: a `TADConfig` used instead of top_k/beta/temperature/eps_alpha/beta_scope.

    Returns:
        (total, {"clm": ..., "div": ...}) (only the parts that are computed); only `total`
        carries a gradient (the parts are under `stop_gradient`).

    Raises:
        ValueError: on mismatched shapes or vocabularies, chunk_size < 1, an invalid TAD setting,
            soft-cap, reduction or divergence, non-integer targets or segment_ids, a divergence
            without the teacher, or no term to compute (no divergence and no targets).
    """
    if divergence not in _DIVERGENCES + (None,):
        raise ValueError(f"divergence must be one of {_DIVERGENCES} when fused, got {divergence!r}")
    tad = config or core.TADConfig(top_k, beta, temperature, eps_alpha, beta_scope)
    if divergence == "kl":  # the kernel at K = 0, β = 1 is KL exactly
        tad = core.TADConfig(top_k=0, beta=1.0, temperature=tad.temperature)
    cfg = _Config(divergence, targets is not None, tad, chunk_size, final_logit_softcap, reduction,
                  student_head_grad)
    as_array = lambda x: None if x is None else jnp.asarray(x)  # (lists, numpy arrays)
    mask, targets, segment_ids = as_array(mask), as_array(targets), as_array(segment_ids)
    args = (student_hidden, student_head, student_bias, teacher_hidden, teacher_head,
            teacher_bias, mask, targets, segment_ids)
    cfg = _check_inputs(cfg, *args)
    if math.prod(student_hidden.shape[:-1]) == 0:  # no position: 0, as the unfused losses
        zero = jnp.zeros(student_hidden.shape[:-1] if reduction == "none" else (), _F32)
        names = ("div",) * (divergence is not None) + ("clm",) * cfg.clm
        return zero, {k: zero for k in names}
    total, parts = _auto_axes(functools.partial(_fused, cfg), cfg.reduction, student_hidden, args)
    return total, jax.lax.stop_gradient(parts)


def _auto_axes(f, reduction, hidden, args):
    """f(*args), run with Explicit mesh axes as Auto ones (`jax.sharding.auto_axes`).

    The chunked scan reshapes, concatenates and contracts sharded arrays, which explicit
    sharding types reject; under Auto axes XLA's sharding propagation places them, as on a mesh
    of Auto axes. The mesh is the context's, else that of the first argument typed with one.
    Per-token outputs (reduction "none") are sharded as the leading axes of `hidden`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        typed = [core._explicit_spec(x)[0] for x in jax.tree.leaves(args)]
        mesh = next((m for m in typed if m is not None and not m.empty), mesh)
    explicit = () if mesh.empty else mesh.explicit_axes
    if not explicit:
        return f(*args)
    out = jax.sharding.PartitionSpec()
    if reduction == "none":
        out = jax.sharding.PartitionSpec(*(core._explicit_spec(hidden)[1] or ())[:-1])
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(f, axes=explicit, out_sharding=out)(*args)


def fused_tad_loss(student_hidden, student_head, teacher_hidden, teacher_head, mask=None, **kw):
    """TAD of the heads' logits in token chunks: `fused_distillation_loss` without the CLM term.

    Keyword arguments, errors and the exactness claim as `fused_distillation_loss`; returns the
    float32 loss (scalar, or [..., T] for reduction="none").
    """
    return fused_distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head,
                                   None, mask, divergence="tad", **kw)[0]


def fused_kl_loss(student_hidden, student_head, teacher_hidden, teacher_head, mask=None, **kw):
    """Vanilla KD, τ²·KL(p_T || p_S), in token chunks (as `fused_tad_loss`, no top-K)."""
    return fused_distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head,
                                   None, mask, divergence="kl", **kw)[0]


def fused_causal_lm_loss(student_hidden, student_head, targets, mask=None, **kw):
    """Cross-entropy of the next tokens (`targets`, already shifted) under the head's logits, in
    token chunks: `losses.causal_lm_loss(softcap(h W + b), targets, mask)`. Keyword arguments:
    chunk_size, student_bias, final_logit_softcap, reduction, student_head_grad."""
    return fused_distillation_loss(student_hidden, student_head, None, None, targets, mask,
                                   divergence=None, **kw)[0]
