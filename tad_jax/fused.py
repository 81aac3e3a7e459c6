"""Distillation losses fused with the output heads, in token chunks: no [N, V] tensor ever exists.

`fused_tad_loss`, `fused_kl_loss`, `fused_causal_lm_loss` and `fused_distillation_loss` take the
final hidden states and the output heads instead of logits. They equal `tad_divergence`,
`kl_divergence`, `causal_lm_loss` and `distillation_loss` of `tad_jax.losses` applied to
`softcap(h @ W + b)`, in value and in gradient (TAD as defined in /work/shared/TAD_SPEC.md).

Shape suffixes: r = rows (the flattened leading axes), t = positions of a row, n = chunks,
a = rows per chunk, c = positions of a row per chunk, m = a·c tokens of one chunk,
d = hidden size, v = vocabulary, k = top-K.

How:
- Each `lax.scan` step takes about `chunk_size` tokens, read in place from the [R, T, d] hidden
  states: whole rows when T <= chunk_size (strided, a multiple of the device count when R is at
  least that), else `c = max(1, chunk_size // R)` positions of every row. A batch sharded over its
  rows stays sharded. Padding (rows or positions) is masked.
- The gradient w.r.t. the student logits is analytic (Eq. 6 of the paper) and is pushed through the
  head inside the forward pass: each step adds `h_md^T dz_mv` to a [d, V] float32 accumulator and
  writes `dz_mv W^T` into dh. With reduction "mean"/"sum" the backward pass only scales these by
  the incoming cotangent; with "none" (a per-token cotangent) the backward pass runs the scan again.
- Exact per-row β(X). ᾱ(X) needs the teacher tail mass of every position of the row before any of
  its gradients can be weighted. When T <= chunk_size every step takes whole rows (`_Layout`) and
  β(X) is computed inside the single pass. Otherwise rows span chunks. Two ways were weighed: (a)
  accumulate the KL part and the tail part of the gradient separately and combine them once β(X) is
  known: the tail part needs its own dh matmul (+d_s·V FLOPs per token) and, for dW, one [d, V]
  accumulator *per row* (a chunk holds positions of every row), which defeats the purpose; (b) a
  teacher pre-pass: one more teacher head matmul (+d_t·V FLOPs per token) computes the top-K
  indices, the teacher log-partition and log α_T of every position ([N, K] + 2·[N], kept), hence
  β(X); the main pass reuses them, so top_k runs once. (b) is implemented. At Gemma2 sizes (d_s =
  2304, d_t = 3584) the head FLOPs are 3·d_s + 2·d_t per token for fused TAD vs 3·d_s + d_t for
  fused KL (1.34×); `scripts/bench_fused.py` measures the pre-pass's share of the time. With a
  frozen head (`student_head_grad=False`) there is no dW, so (a) needs no per-row accumulator: it is
  used then (+d_s instead of +d_t, top_k once, no pre-pass), and also for values without gradients.
- Memory: temporaries are O(chunk_size·V + d_s·V + N·(K + d)), flat in N in practice. XLA
  temporaries of fused TAD fwd+bwd at V = 256000, d = 2304/3584 (`scripts/bench_fused.py`):
  2.89 GB at N = 4K, 16K and 64K tokens with chunk_size = 512 (5.25 GB with 1024; 2.36 GB of it
  is the float32 dW accumulator) vs 21 / 88 / 352 GB unfused.
- Time, fwd+bwd on 2 CPU cores (N = 2048 as 2 rows, V = 32000, d = 256/384, chunk_size 256):
  fused TAD 1.43 s = 0.48× unfused TAD (2.97 s) and 1.40× fused KL (1.02 s), the teacher pre-pass
  34% of it (the main pass alone costs as much as fused KL); frozen head (deferred β) 1.55× fused
  KL; whole rows per step (chunk_size = T, no pre-pass) 1.33× fused KL: top_k and the tail
  log-sum-exps remain. On an accelerator, where the head matmuls dominate, expect about
  (3·d_s + 2·d_t) / (3·d_s + d_t) = 1.34× at Gemma2 sizes with a pre-pass, ≈ 1× + top_k without.
- Top-K membership by scattering the indices into the values (-inf) or into a float 0/1 tail
  weight: on XLA CPU 3-5× faster than a boolean mask + `where`, and ~10× faster over the whole
  loss than an iota comparison per index (`t >= kth_value` is worse still, see the spec).
- Teacher inputs get zero cotangents (the teacher is a constant of the loss, as in
  `tad_divergence`); so does the student head with `student_head_grad=False` (a frozen head).
- Float32 inside whatever the input dtype (bf16 heads: the head matmuls accumulate in float32);
  cotangents are computed in float32 and cast once to the dtype of their input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tad_jax import losses

_F32 = jnp.float32
_REDUCTIONS = ("none", "sum", "mean")
_DIVERGENCES = ("tad", "kl")
# Unroll factor of the chunk scans. Benchmarks set it to True: XLA's cost analysis counts a loop
# body once, so FLOPs and bytes of the whole loss need the loop unrolled.
_UNROLL = 1


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static settings of one fused loss (hashable: a `custom_vjp` non-differentiable argument)."""

    divergence: str | None  # "tad", "kl" or None (CLM only)
    clm: bool
    top_k: int
    beta: float
    temperature: float
    eps_alpha: float
    chunk_size: int
    softcap: float | None
    reduction: str
    head_grad: bool = True  # False: no dW (a frozen head, e.g. tied to frozen embeddings)


# ----------------------------------------------------------------------------- argument checks


def _check_scalars(cfg: _Config, vocab: int) -> _Config:
    """Checks the static settings (the same checks as `tad_divergence`); returns them as floats."""
    if (
        isinstance(cfg.chunk_size, bool)
        or not isinstance(cfg.chunk_size, int)
        or cfg.chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be an integer >= 1 (tokens per step), got {cfg.chunk_size!r}"
        )
    losses._check_reduction(cfg.reduction)
    cap = cfg.softcap
    if cap is not None:
        cap = losses._check_positive("final_logit_softcap (None for no cap)", cap)
    cfg = dataclasses.replace(cfg, softcap=cap)
    if cfg.divergence is None:
        return cfg
    if cfg.divergence not in _DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {_DIVERGENCES} when fused, got {cfg.divergence!r}"
        )
    tau = losses._check_positive("temperature", cfg.temperature)
    if cfg.divergence == "kl":
        return dataclasses.replace(cfg, temperature=tau)
    losses._check_top_k(cfg.top_k, vocab)
    beta = losses._check_positive("beta", cfg.beta)
    eps = losses._check_positive("eps_alpha", cfg.eps_alpha)
    return dataclasses.replace(cfg, temperature=tau, beta=beta, eps_alpha=eps)


def _check_head(who: str, hidden, head, bias) -> int:
    """Checks one (hidden [..., T, d], head [d, V], bias [V]) triple; returns V."""
    if hidden.ndim < 2:
        raise ValueError(f"{who}_hidden must be [..., T, d], got shape {hidden.shape}")
    if head.ndim != 2:
        raise ValueError(f"{who}_head must be a 2-D [d, V] matrix, got shape {head.shape}")
    if head.shape[0] != hidden.shape[-1]:
        transposed = head.shape[1] == hidden.shape[-1]
        hint = " (transpose it: an embedding table is [V, d])" if transposed else ""
        raise ValueError(
            f"{who}_head is {head.shape} but {who}_hidden has hidden size {hidden.shape[-1]}: "
            f"the head must be [d, V] = [{hidden.shape[-1]}, V]{hint}"
        )
    if bias is not None and bias.shape != (head.shape[1],):
        raise ValueError(f"{who}_bias must have shape [V] = ({head.shape[1]},), got {bias.shape}")
    return head.shape[1]


def _check_inputs(cfg, hs, ws, bs, ht, wt, bt, mask, targets) -> _Config:
    vocab = _check_head("student", hs, ws, bs)
    if ht is not None:
        if _check_head("teacher", ht, wt, bt) != vocab:
            raise ValueError(
                f"the heads disagree on the vocabulary: student {ws.shape} vs teacher {wt.shape}; "
                "pad the smaller head's columns (with -inf bias) to a shared vocabulary"
            )
        if ht.shape[:-1] != hs.shape[:-1]:
            raise ValueError(
                f"teacher_hidden {ht.shape} and student_hidden {hs.shape} must share [..., T]"
            )
    if mask is not None and mask.shape != hs.shape[:-1]:
        raise ValueError(f"mask must have shape [..., T] = {hs.shape[:-1]}, got {mask.shape}")
    if targets is not None:
        if targets.shape != hs.shape[:-1]:
            raise ValueError(
                f"targets must have shape [..., T] = {hs.shape[:-1]}, got {targets.shape}"
            )
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise ValueError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    return _check_scalars(cfg, vocab)


# ----------------------------------------------------------------------------- layout


def _mask_rt(mask, rows: int, t: int):
    """The validity mask as float32 0/1 [R, T]; any non-zero entry counts (as in `losses`)."""
    if mask is None:
        return jnp.ones((rows, t), _F32)
    return (mask.reshape(rows, t) != 0).astype(_F32)


class _Layout(NamedTuple):
    """How the [R, T] tokens are cut into n steps of a·c tokens (a rows × c positions).

    by_rows=False: every step takes c positions of every row (a = R); rows span the chunks.
    by_rows=True (T <= chunk_size): every step takes whole rows (c = T), a of them, strided
    (step i holds rows i, n + i, 2n + i, ...) so that a batch sharded over its rows in contiguous
    blocks keeps each step spread over all shards. No row spans two chunks: β(X) needs no pre-pass.
    """

    rows: int
    t: int
    a: int
    n: int
    c: int
    by_rows: bool


def _layout(rows: int, t: int, chunk_size: int) -> _Layout:
    """Whole rows per step when T <= chunk_size, unless that would leave a batch sharded over
    its rows unevenly spread (fewer rows per step than devices, or not a multiple of them)."""
    devices = jax.device_count()
    a = min(rows, chunk_size // t)
    if rows >= devices:  # the rows may be sharded: a multiple of the device count per step
        a -= a % devices
    if a >= 1 and rows > 1:
        return _Layout(rows, t, a, -(-rows // a), t, True)
    c = min(t, max(1, chunk_size // rows))
    return _Layout(rows, t, rows, -(-t // c), c, False)


def _blocks(lay: _Layout, x_rt):
    """[R, T, ...] -> [a, n, c, ...]: a reshape, plus a zero-padded copy when n·c or a·n is
    larger than T or R (the padding is masked)."""
    axis, size = (0, lay.rows) if lay.by_rows else (1, lay.t)
    extra = lay.a * lay.n - size if lay.by_rows else lay.n * lay.c - size
    if extra:
        x_rt = jnp.pad(x_rt, [(0, extra if i == axis else 0) for i in range(x_rt.ndim)])
    # by rows: row s·n + i -> [s, i]; by time: position j·c + k of row r -> [r, j, k].
    return x_rt.reshape((lay.a, lay.n, lay.c) + x_rt.shape[2:])


def _unblock(lay: _Layout, x_anc):
    """[a, n, c, ...] -> [R, T, ...] (drops the padding)."""
    if lay.by_rows:
        return x_anc.reshape((lay.a * lay.n, lay.t) + x_anc.shape[3:])[: lay.rows]
    return x_anc.reshape((lay.rows, lay.n * lay.c) + x_anc.shape[3:])[:, : lay.t]


def _to_chunks(lay: _Layout, x_rt):
    """[R, T, ...] -> [n, m = a·c, ...] for the per-token inputs (mask, targets, weights, teacher
    statistics): small, so a transposed copy is cheap; the hidden states are read in place."""
    x = jnp.moveaxis(_blocks(lay, x_rt), 1, 0)
    return x.reshape((lay.n, lay.a * lay.c) + x.shape[3:])


def _from_chunks(lay: _Layout, x_nm):
    """[n, m = a·c, ...] -> [R, T, ...]."""
    x = x_nm.reshape((lay.n, lay.a, lay.c) + x_nm.shape[2:])
    return _unblock(lay, jnp.moveaxis(x, 0, 1))


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


def _drop_top(x_mv, idx_mk, fill):
    """x with its top-K entries replaced by `fill`, by scattering the indices.

    Measured on XLA CPU ([256, 32000]): scattering into the values (or into a float32 0/1 tail
    weight) is 3-5x faster than a boolean membership mask followed by `where`, and far faster than
    comparing against an iota per index or `t >= kth_value` (see the spec).
    """
    if idx_mk.shape[-1] == 0:  # K = 0: nothing is in the top set
        return x_mv
    return x_mv.at[jnp.arange(idx_mk.shape[0])[:, None], idx_mk].set(fill)


def _teacher_stats(lt_mv, top_k: int):
    """Top-K indices, log-partition and log tail mass of tempered teacher logits."""
    if top_k == 0:  # the tail is the whole vocabulary: α_T = 1
        idx = jnp.zeros(lt_mv.shape[:-1] + (0,), jnp.int32)
    else:
        _, idx = jax.lax.top_k(lt_mv, top_k)
    lse = losses._lse(lt_mv)
    # log α_T from the log-sum-exp of the tail, never as log(1 - top mass) (cancellation).
    log_at = losses._lse(_drop_top(lt_mv, idx, -jnp.inf)) - lse
    return idx, lse, log_at


def _gamma(log_at_rt, mask_rt, cfg: _Config):
    """β(X) − 1 per position [R, T] (`losses._beta_x`: ᾱ over the row's valid positions)."""
    beta_x_r = losses._beta_x(log_at_rt, mask_rt, cfg.beta, cfg.eps_alpha)
    return jnp.broadcast_to(beta_x_r[:, None] - 1.0, mask_rt.shape)


def _div_terms(ls_mv, lt_mv, lse_t_m, idx_mk, log_at_m):
    """KL, α_T·D_KL2 per token and their gradients w.r.t. the tempered student logits.

    Returns (kl_m, tail_m, g_kl_mv, g_tail_mv); the tail pieces are None for plain KL
    (`idx_mk` None).
    """
    logp_s = jax.nn.log_softmax(ls_mv, axis=-1)
    logp_t = lt_mv - lse_t_m[..., None]
    p_s, p_t = jnp.exp(logp_s), jnp.exp(logp_t)
    # 0 · log 0 = 0: positions where the teacher puts no mass (e.g. -inf padded vocabulary).
    terms = jnp.where(p_t > 0, p_t * (logp_t - logp_s), 0.0)
    kl = terms.sum(-1)
    if idx_mk is None:
        return kl, None, p_s - p_t, None
    tail_w = _drop_top(jnp.ones_like(p_t), idx_mk, 0.0)  # 1 on the tail, 0 on the top-K
    # log α_S from the tail's own log-sum-exp (finite even when the tail underflows p_S); its
    # exponentials e_i = exp(z_i − max_tail) also give α_T·p̃_S,i = e_i · α_T / Σe (no 2nd exp).
    logp_s_tail = _drop_top(logp_s, idx_mk, -jnp.inf)
    max_tail = jnp.max(logp_s_tail, axis=-1)
    max_tail = jnp.where(jnp.isfinite(max_tail), max_tail, 0.0)
    e = jnp.exp(logp_s_tail - max_tail[:, None])
    log_sum_e = jnp.log(e.sum(-1))
    log_as = max_tail + log_sum_e
    has_tail = log_at_m > -jnp.inf  # α_T = 0: the tail term is 0, not NaN
    log_ratio = jnp.where(has_tail, log_at_m - log_as, 0.0)
    tail_kl = (tail_w * terms).sum(-1)
    tail = jnp.where(has_tail, tail_kl - jnp.exp(log_at_m) * log_ratio, 0.0)
    # ∂(α_T D_KL2)/∂z_i = p_S,i α_T/α_S − p_T,i on the tail, 0 on the top-K.
    scale = jnp.where(has_tail, jnp.exp(log_at_m - log_sum_e), 0.0)
    g_tail = e * scale[:, None] - tail_w * p_t
    return kl, tail, p_s - p_t, g_tail


def _clm_terms(zs_mv, y_m):
    """Cross-entropy per token and its gradient w.r.t. the (untempered) student logits."""
    logp = jax.nn.log_softmax(zs_mv, axis=-1)
    nll = -jnp.take_along_axis(logp, y_m[..., None], axis=-1)[..., 0]
    onehot = jnp.arange(zs_mv.shape[-1]) == y_m[..., None]
    return nll, jnp.exp(logp) - onehot


def _chunk(cfg: _Config, params, xs, rows: int, want_grad: bool, defer: bool):
    """One scan step on m tokens: per-token losses [m] and, if wanted, dz of raw logits [m, V].

    β(X) comes from `xs["gamma"]` (pre-pass), from the chunk itself (it holds whole rows), or, if
    `defer`, is not known yet: then the KL and tail parts stay apart (losses "kl"/"tail", and dz
    as a pair) for `_run` to combine once ᾱ(X) is known.
    """
    ws, bs, wt, bt = params
    zs, dcap = _logits(xs["hs"], ws, bs, cfg.softcap)
    out, dzs = {}, [jnp.zeros_like(zs)]
    if cfg.divergence is not None:
        tau = cfg.temperature
        lt, _ = _logits(xs["ht"], wt, bt, cfg.softcap)
        lt = lt / tau
        if cfg.divergence == "tad" and "idx" not in xs:  # no pre-pass
            idx, lse_t, log_at = _teacher_stats(lt, cfg.top_k)
            xs = dict(xs, idx=idx, lse_t=lse_t, log_at=log_at)
            if not defer:  # the chunk holds whole rows
                gamma = _gamma(log_at.reshape(rows, -1), xs["mask"].reshape(rows, -1), cfg)
                xs["gamma"] = gamma.reshape(-1)
        lse_t = xs["lse_t"] if "lse_t" in xs else losses._lse(lt)
        kl, tail, g_kl, g_tail = _div_terms(zs / tau, lt, lse_t, xs.get("idx"), xs.get("log_at"))
        # τ² · (KL + (β(X) − 1) α_T D_KL2) = τ² · (D_KL1 + β(X) α_T D_KL2).
        if defer:
            out.update(kl=tau * tau * kl, tail=tau * tau * tail, log_at=xs["log_at"])
        else:
            out["div"] = tau * tau * (kl if tail is None else kl + xs["gamma"] * tail)
        if want_grad:
            w = (tau * xs["w"])[:, None]  # τ² · ∂/∂(z/τ) · 1/τ
            if defer:
                dzs = [dzs[0] + w * g_kl, w * g_tail]
            else:
                g = g_kl if g_tail is None else g_kl + xs["gamma"][:, None] * g_tail
                dzs[0] = dzs[0] + w * g
    if cfg.clm:
        out["clm"], g_clm = _clm_terms(zs, xs["targets"])
        if want_grad:
            dzs[0] = dzs[0] + xs["w"][:, None] * g_clm
    if want_grad and dcap is not None:
        dzs = [dz * dcap for dz in dzs]
    return out, dzs


# ----------------------------------------------------------------------------- scans


def _take(x_rncd, i):
    """Chunk i of every row, [m = R·c, d], read in place (no transposed copy of the input)."""
    x = jax.lax.dynamic_index_in_dim(x_rncd, i, axis=1, keepdims=False)
    return x.reshape(-1, x.shape[-1])


def _prepare(cfg: _Config, hs, ht, mask, targets):
    """The hidden states as blocks [a, n, c, d], per-token inputs as chunks [n, m], the mask."""
    t = hs.shape[-2]
    rows = math.prod(hs.shape[:-2])
    lay = _layout(rows, t, cfg.chunk_size)
    mask_rt = _mask_rt(mask, rows, t)
    big = {"hs": _blocks(lay, hs.reshape(rows, t, -1))}
    if ht is not None:
        big["ht"] = _blocks(lay, ht.reshape(rows, t, -1))
    small = {"i": jnp.arange(lay.n), "mask": _to_chunks(lay, mask_rt)}
    if targets is not None:
        small["targets"] = _to_chunks(lay, targets.reshape(rows, t).astype(jnp.int32))
    return lay, big, small, mask_rt


def _pre_pass(cfg: _Config, lay: _Layout, wt, bt, big, small, mask_rt):
    """Teacher statistics of every chunk (top-K indices, log-partition, log α_T) and β(X) − 1."""

    def body(_, i):
        lt, _ = _logits(_take(big["ht"], i), wt, bt, cfg.softcap)
        idx, lse, log_at = _teacher_stats(lt / cfg.temperature, cfg.top_k)
        return None, {"idx": idx, "lse_t": lse, "log_at": log_at}

    _, stats = jax.lax.scan(body, None, small["i"], unroll=_UNROLL)
    gamma_rt = _gamma(_from_chunks(lay, stats["log_at"]), mask_rt, cfg)
    stats["gamma"] = _to_chunks(lay, gamma_rt)
    return stats


def _main_pass(cfg: _Config, params, big, small, want_grad: bool, defer: bool):
    """Scans the chunks: per-token losses [n, m] and, if wanted, (dW, dbs, dhs).

    dbs/dhs hold db [V] and dh [R, n, c, d], plus, if `defer`, the tail parts: db per row [R, V]
    and dh (the head gradient is never deferred: `defer` implies a frozen head or no gradient).
    """
    ws = params[0]
    rows = big["hs"].shape[0]  # rows per step
    carry0 = ()
    if want_grad:  # float32 accumulators; dh is written in place, chunk by chunk
        dbs = (jnp.zeros(ws.shape[1], _F32),) + ((jnp.zeros((rows, ws.shape[1]), _F32),) * defer)
        dhs = (jnp.zeros(big["hs"].shape, _F32),) * (1 + defer)
        carry0 = (jnp.zeros(ws.shape if cfg.head_grad else (), _F32), dbs, dhs)

    def body(carry, xs_c):
        i = xs_c["i"]
        xs_c = dict(xs_c, **{k: _take(v, i) for k, v in big.items()})
        out, dzs = _chunk(cfg, params, xs_c, rows, want_grad, defer)
        if not want_grad:
            return carry, out
        dw, dbs, dhs = carry
        if cfg.head_grad:  # skipped for a frozen head: a third of the student's head FLOPs
            hs = xs_c["hs"].astype(_F32)
            dw = dw + jnp.einsum("md,mv->dv", hs, dzs[0], preferred_element_type=_F32)
        new_dbs, new_dhs = [], []
        for db, dh, dz in zip(dbs, dhs, dzs, strict=True):
            new_dbs.append(db + dz.reshape(db.shape[:-1] + (-1, dz.shape[-1])).sum(-2))
            dh_md = jnp.einsum("mv,dv->md", dz, ws.astype(_F32), preferred_element_type=_F32)
            dh_rcd = dh_md.reshape(rows, -1, dh.shape[-1])
            new_dhs.append(jax.lax.dynamic_update_index_in_dim(dh, dh_rcd, i, axis=1))
        return (dw, tuple(new_dbs), tuple(new_dhs)), out

    return jax.lax.scan(body, carry0, small, unroll=_UNROLL)


def _combine_deferred(cfg: _Config, lay: _Layout, out, grads, mask_rt):
    """β(X) known at last: div = KL + (β(X) − 1)·tail per token [R, T], dh and db likewise."""
    kl, tail, log_at = (out.pop(k) for k in ("kl", "tail", "log_at"))
    gamma_rt = _gamma(log_at, mask_rt, cfg)
    out["div"] = kl + gamma_rt * tail
    if not grads:
        return out, grads
    dw, (db, db_tail), (dh, dh_tail) = grads
    db = db + (gamma_rt[:, :1] * db_tail).sum(0)  # by_rows=False here: a = R
    dh = _unblock(lay, dh) + gamma_rt[..., None] * _unblock(lay, dh_tail)
    return out, (dw, (db,), (dh,))


def _run(cfg: _Config, params, hs, ht, mask, targets, weights_rt, want_grad: bool):
    """Per-token losses [R, T] and, if wanted, the gradients (dh, dW, db), in float32.

    TAD with rows spanning several chunks gets β(X) from a teacher pre-pass when the head's
    gradient is wanted, and otherwise (frozen head, or values only) defers the tail parts until
    β(X) is known.
    """
    lay, big, small, mask_rt = _prepare(cfg, hs, ht, mask, targets)
    several = cfg.divergence == "tad" and lay.n > 1 and not lay.by_rows
    defer = several and not (want_grad and cfg.head_grad)
    if several and not defer:
        small.update(_pre_pass(cfg, lay, params[2], params[3], big, small, mask_rt))
    if want_grad:
        small["w"] = _to_chunks(lay, weights_rt)
    grads, out = _main_pass(cfg, params, big, small, want_grad, defer)
    out = {k: _from_chunks(lay, v) for k, v in out.items()}
    if defer:
        out, grads = _combine_deferred(cfg, lay, out, grads, mask_rt)
    elif want_grad:
        dw, dbs, (dh,) = grads
        grads = (dw, dbs, (_unblock(lay, dh),))
    # where, not multiply: a masked position may hold inf (e.g. a -inf target logit).
    per_tok = {k: jnp.where(mask_rt > 0, v, 0.0) for k, v in out.items() if k in ("clm", "div")}
    if want_grad:
        dw, (db,), (dh,) = grads
        grads = (dh.reshape(hs.shape[:-1] + (-1,)), dw, db)
    return per_tok, mask_rt, grads


# ----------------------------------------------------------------------------- custom_vjp


def _reduce(cfg: _Config, loss_rt, mask_rt, lead_shape):
    return losses._reduce(loss_rt.reshape(lead_shape), mask_rt, cfg.reduction)


def _outputs(cfg: _Config, per_tok, mask_rt, lead_shape):
    parts = {k: _reduce(cfg, v, mask_rt, lead_shape) for k, v in per_tok.items()}
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
def _fused(cfg: _Config, hs, ws, bs, ht, wt, bt, mask, targets):
    per_tok, mask_rt, _ = _run(cfg, (ws, bs, wt, bt), hs, ht, mask, targets, None, False)
    return _outputs(cfg, per_tok, mask_rt, hs.shape[:-1])


def _fused_fwd(cfg: _Config, hs, ws, bs, ht, wt, bt, mask, targets):
    params = (ws, bs, wt, bt)
    if cfg.reduction == "none":  # per-token cotangent: the backward pass runs the scan again
        per_tok, mask_rt, _ = _run(cfg, params, hs, ht, mask, targets, None, False)
        res = (params, hs, ht, mask, targets)
    else:  # scalar cotangent: the gradient is computed now and only scaled later
        w_rt = _weights(cfg, mask, hs)
        per_tok, mask_rt, grads = _run(cfg, params, hs, ht, mask, targets, w_rt, True)
        # float32 residuals, cast once after scaling (casting twice would round bf16 twice).
        res = (grads, _dtypes_like(hs, ws, bs))
    return _outputs(cfg, per_tok, mask_rt, hs.shape[:-1]), res


def _fused_bwd(cfg: _Config, res, cts):
    # Only the total carries a gradient: the public functions stop the gradient of the parts.
    ct = cts[0]
    if cfg.reduction == "none":
        params, hs, ht, mask, targets = res
        rows = math.prod(hs.shape[:-2])
        w_rt = ct.reshape(rows, hs.shape[-2]).astype(_F32)
        w_rt = w_rt * _mask_rt(mask, *w_rt.shape)
        _, _, grads = _run(cfg, params, hs, ht, mask, targets, w_rt, True)
        dh, dw, db = _cast_grads(grads, hs, params[0], params[1])
    else:
        (dh, dw, db), like = res
        dh, dw, db = _cast_grads((ct * dh, ct * dw, ct * db), *like)
    # Zero cotangents for the teacher (a constant of the loss), the mask and the targets.
    return dh, dw, db, None, None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _call(cfg: _Config, hs, ws, bs, ht, wt, bt, mask, targets):
    cfg = _check_inputs(cfg, hs, ws, bs, ht, wt, bt, mask, targets)
    total, parts = _fused(cfg, hs, ws, bs, ht, wt, bt, mask, targets)
    return total, jax.lax.stop_gradient(parts)


# ----------------------------------------------------------------------------- public API


def fused_tad_loss(
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    mask=None,
    *,
    top_k: int = 10,
    beta: float = 2.0,
    temperature: float = 1.0,
    eps_alpha: float = 1e-6,
    chunk_size: int = 1024,
    student_bias=None,
    teacher_bias=None,
    final_logit_softcap: float | None = None,
    reduction: str = "mean",
    student_head_grad: bool = True,
):
    """TAD divergence of the heads' logits, computed in token chunks (no [N, V] tensor).

    Equals `tad_divergence(softcap(h_s @ W_s + b_s), softcap(h_t @ W_t + b_t), mask, ...)` in value
    and in its gradients w.r.t. the student's hidden states, head and bias, with the exact per-row
    β(X) of TAD_SPEC.md even when a row spans several chunks (teacher pre-pass, see the module doc).

    Args:
        student_hidden: final student hidden states [..., T, d_s] (after the last norm).
        student_head: student output head [d_s, V] (a tied embedding table transposed).
        teacher_hidden: final teacher hidden states [..., T, d_t]; a constant (zero cotangent).
        teacher_head: teacher output head [d_t, V]; a constant (zero cotangent).
        mask: [..., T], 1 where the position counts; None means all positions count.
        top_k: K, the size of the teacher's top set, 0 <= K < V.
        beta: β > 0 of Eq. 3.
        temperature: τ > 0; the divergence is multiplied by τ².
        eps_alpha: floor of the mean teacher tail mass ᾱ(X) in β(X) = β / max(ᾱ(X), eps_alpha).
        chunk_size: tokens per scan step (summed over the rows; each step takes
            max(1, chunk_size // rows) positions of every row). Peak memory ~ chunk_size × V floats.
        student_bias: optional [V] bias of the student head.
        teacher_bias: optional [V] bias of the teacher head.
        final_logit_softcap: Gemma2's soft-cap c (logits = c·tanh(logits / c), before τ), or None.
        reduction: "none" ([..., T], 0 at masked positions), "sum", or "mean" (over the valid
            positions of the whole batch).
        student_head_grad: False for a frozen head (e.g. tied to frozen embeddings): the head's
            gradient is then not computed (zero cotangent), saving d·V FLOPs per token and a
            [d, V] float32 accumulator.

    Returns:
        The loss: a float32 scalar, or [..., T] for reduction="none".

    Raises:
        ValueError: on mismatched shapes or vocabularies, chunk_size < 1, or an invalid top_k, beta,
            temperature, eps_alpha, soft-cap or reduction.
    """
    cfg = _Config(
        divergence="tad",
        clm=False,
        top_k=top_k,
        beta=beta,
        temperature=temperature,
        eps_alpha=eps_alpha,
        chunk_size=chunk_size,
        softcap=final_logit_softcap,
        reduction=reduction,
        head_grad=student_head_grad,
    )
    return _call(
        cfg,
        student_hidden,
        student_head,
        student_bias,
        teacher_hidden,
        teacher_head,
        teacher_bias,
        mask,
        None,
    )[0]


def fused_kl_loss(
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    mask=None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    student_bias=None,
    teacher_bias=None,
    final_logit_softcap: float | None = None,
    reduction: str = "mean",
    student_head_grad: bool = True,
):
    """Vanilla KD, τ² · KL(p_T || p_S), of the heads' logits computed in token chunks.

    Equals `kl_divergence(softcap(h_s @ W_s + b_s), softcap(h_t @ W_t + b_t), mask, ...)` in value
    and in its gradients w.r.t. the student's hidden states, head and bias. One pass, no top_k.

    Args:
        student_hidden: final student hidden states [..., T, d_s].
        student_head: student output head [d_s, V].
        teacher_hidden: final teacher hidden states [..., T, d_t]; a constant (zero cotangent).
        teacher_head: teacher output head [d_t, V]; a constant (zero cotangent).
        mask: [..., T], 1 where the position counts; None means all positions count.
        temperature: τ > 0; the divergence is multiplied by τ².
        chunk_size: tokens per scan step (see `fused_tad_loss`).
        student_bias: optional [V] bias of the student head.
        teacher_bias: optional [V] bias of the teacher head.
        final_logit_softcap: Gemma2's soft-cap (before τ), or None.
        reduction: "none", "sum" or "mean" (as in `fused_tad_loss`).
        student_head_grad: False for a frozen head (see `fused_tad_loss`).

    Returns:
        The loss: a float32 scalar, or [..., T] for reduction="none".

    Raises:
        ValueError: on mismatched shapes or vocabularies, chunk_size < 1, or an invalid temperature,
            soft-cap or reduction.
    """
    cfg = _Config(
        divergence="kl",
        clm=False,
        top_k=0,
        beta=1.0,
        temperature=temperature,
        eps_alpha=1.0,
        chunk_size=chunk_size,
        softcap=final_logit_softcap,
        reduction=reduction,
        head_grad=student_head_grad,
    )
    return _call(
        cfg,
        student_hidden,
        student_head,
        student_bias,
        teacher_hidden,
        teacher_head,
        teacher_bias,
        mask,
        None,
    )[0]


def fused_causal_lm_loss(
    student_hidden,
    student_head,
    targets,
    mask=None,
    *,
    chunk_size: int = 1024,
    student_bias=None,
    final_logit_softcap: float | None = None,
    reduction: str = "mean",
    student_head_grad: bool = True,
):
    """Cross-entropy of the next tokens under the head's logits, computed in token chunks.

    Equals `causal_lm_loss(softcap(h @ W + b), targets, mask, ...)`: `targets` are already the next
    tokens, aligned with `student_hidden` (no shift here). No temperature.

    Args:
        student_hidden: final hidden states [..., T, d].
        student_head: output head [d, V].
        targets: int token ids [..., T] in [0, V).
        mask: [..., T], 1 where the position counts; None means all positions count.
        chunk_size: tokens per scan step (see `fused_tad_loss`).
        student_bias: optional [V] bias of the head.
        final_logit_softcap: Gemma2's soft-cap, or None.
        reduction: "none", "sum" or "mean" (as in `fused_tad_loss`).
        student_head_grad: False for a frozen head (see `fused_tad_loss`).

    Returns:
        The loss: a float32 scalar, or [..., T] for reduction="none".

    Raises:
        ValueError: on mismatched shapes, non-integer targets, chunk_size < 1, an invalid soft-cap
            or reduction.
    """
    cfg = _Config(
        divergence=None,
        clm=True,
        top_k=0,
        beta=1.0,
        temperature=1.0,
        eps_alpha=1.0,
        chunk_size=chunk_size,
        softcap=final_logit_softcap,
        reduction=reduction,
        head_grad=student_head_grad,
    )
    return _call(cfg, student_hidden, student_head, student_bias, None, None, None, mask, targets)[
        0
    ]


def fused_distillation_loss(
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    targets,
    mask=None,
    *,
    divergence: str = "tad",
    top_k: int = 10,
    beta: float = 2.0,
    temperature: float = 1.0,
    eps_alpha: float = 1e-6,
    chunk_size: int = 1024,
    student_bias=None,
    teacher_bias=None,
    final_logit_softcap: float | None = None,
    reduction: str = "mean",
    student_head_grad: bool = True,
):
    """Eq. 4, L_CLM + L_DIV, in one chunked pass: each chunk's student logits serve both terms.

    Equals `distillation_loss(student_logits, teacher_logits, targets, mask, divergence=...)` of
    `tad_jax.losses` without the cosine term (add `cosine_hidden_loss` separately if wanted).

    Args:
        student_hidden: final student hidden states [..., T, d_s].
        student_head: student output head [d_s, V].
        teacher_hidden: final teacher hidden states [..., T, d_t]; a constant (zero cotangent).
        teacher_head: teacher output head [d_t, V]; a constant (zero cotangent).
        targets: int next-token ids [..., T].
        mask: [..., T], 1 where the position counts; None means all positions count.
        divergence: "tad" or "kl" (vanilla KD).
        top_k: K of TAD.
        beta: β of TAD.
        temperature: τ of the divergence (the CLM term is at τ = 1).
        eps_alpha: floor of ᾱ(X) in TAD.
        chunk_size: tokens per scan step (see `fused_tad_loss`).
        student_bias: optional [V] bias of the student head.
        teacher_bias: optional [V] bias of the teacher head.
        final_logit_softcap: Gemma2's soft-cap (before τ), or None.
        reduction: "none", "sum" or "mean".
        student_head_grad: False for a frozen head (see `fused_tad_loss`).

    Returns:
        (total, {"clm": ..., "div": ...}); only `total` carries a gradient (the parts are
        reported under `stop_gradient`, so differentiate the total).

    Raises:
        ValueError: on any invalid argument, as the single-term functions.
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {_DIVERGENCES} when fused, got {divergence!r}")
    cfg = _Config(
        divergence=divergence,
        clm=True,
        top_k=top_k,
        beta=beta,
        temperature=temperature,
        eps_alpha=eps_alpha,
        chunk_size=chunk_size,
        softcap=final_logit_softcap,
        reduction=reduction,
        head_grad=student_head_grad,
    )
    return _call(
        cfg,
        student_hidden,
        student_head,
        student_bias,
        teacher_hidden,
        teacher_head,
        teacher_bias,
        mask,
        targets,
    )
