"""TAD and KL from cached teacher statistics: an exact head and an unbiased tail.

Conventions are `tad_jax.losses`' (`../shared/TAD_SPEC.md`): logits `[..., T, V]`, mask `[..., T]`,
probabilities at temperature τ and the divergence times τ², reductions "none" / "sum" / "mean"
(over the valid positions of the whole batch), float32 inside, teacher constant. Shapes: `_btv`
= [..., T, V], `_btk` = [..., T, K], `_btm` = [..., T, M], `_bt` = [..., T], `_b` = [...].

Per position, with I the teacher's top K and the tail its complement (spec, "Offline teacher
statistics"):
- D_KL1 = Σ_I p_T (log p_T − log p_S) + α_T (log α_T − log α_S): exact (p_T, α_T from the cache,
  the student side from its full logits);
- α_T·D_KL2 = Σ_tail p_T log p_T − α_T log α_T − Σ_tail p_T log p̃_S. The first two are cached
  constants; the last is Σ_m w_m log p̃_S(id_m) over weighted *tail targets* (`TailTargets`),
  whose expectation is exactly Σ_tail p_T log p̃_S: S i.i.d. draws from p̃_T of weight α_T / S
  each. Value and gradient are therefore unbiased; the gradient's tail target is the samples'
  empirical distribution instead of p̃_T;
- β(X) = β / max(ᾱ(X), eps_alpha) from the cached α_T of the row: exact.

Reading a K_max cache with K < K_max (`read_top_k`): the K-tail is the K_max-tail plus the head
entries K..K_max−1. Those are known exactly, so they become tail targets of weight p_T,j; the S
draws from the K_max tail keep weight α_T(K_max) / S, i.e. the sampled part is reweighted by the
K_max tail's share α_T(K_max) / α_T(K) of the K-tail's mass (everything here is unnormalised
mass, so the share is implicit). α_T(K) and Σ_{K-tail} p log p add the extra entries' terms.

The per-position pieces (`student_log_normalisers`, `head_term`, `bucket_term`, `tail_cross`,
`beta_x`) are small functions so that a fused kernel can drive them the same way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tad_jax import checks, tad_core
from tad_jax.teacher_cache.stats import TeacherStats, _lse, head_mask

_REDUCTIONS = ("none", "sum", "mean")
# Student logits are clipped at -_FLOOR before gathers: a -inf gives a huge loss, not NaN.
_FLOOR = 1e30


class TailTargets(NamedTuple):
    """The cached teacher at one K: an exact head and weighted tail targets (float32 / int32)."""

    head_ids: jax.Array  # int32 [..., T, K]
    head_logp: jax.Array  # float32 [..., T, K], log p_T
    log_alpha: jax.Array  # float32 [..., T], log α_T of the K-tail
    tail_plogp: jax.Array  # float32 [..., T], Σ_{K-tail} p_T log p_T (unnormalised)
    tail_ids: jax.Array  # int32 [..., T, M], M = (K_max − K) + S
    tail_mass: jax.Array  # float32 [..., T, M], Σ_m = α_T (exactly, up to rounding)


# ----------------------------------------------------------------------------------------------
# Teacher side: the cache at a given K
# ----------------------------------------------------------------------------------------------


def _xlogx_sum(logp_btk):
    return jnp.sum(jnp.where(jnp.isfinite(logp_btk), jnp.exp(logp_btk) * logp_btk, 0.0), -1)


def read_top_k(stats: TeacherStats, top_k: int) -> TailTargets:
    """The cache's statistics for K = top_k <= K_max (module docstring).

    Raises:
      ValueError: top_k outside [0, K_max].
    """
    k_max = stats.head_ids.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= k_max:
        raise ValueError(f"top_k must be an int in [0, K_max={k_max}] (the cache keeps K_max "
                         f"head entries; write a cache with a larger K_max), got {top_k!r}.")
    wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
    head_logp, log_alpha_max = wide(stats.head_logp), wide(stats.log_alpha)
    has_tail = jnp.isfinite(log_alpha_max)
    # Σ_{K_max tail} p log p = α (log α − H̃); 0 without tail mass.
    plogp_max = jnp.where(has_tail, jnp.exp(log_alpha_max) * (
        jnp.where(has_tail, log_alpha_max, 0.0) - wide(stats.tail_entropy)), 0.0)
    extra_logp = head_logp[..., top_k:]
    num_samples = stats.sample_ids.shape[-1]
    sample_mass = jnp.exp(log_alpha_max)[..., None] / num_samples
    return TailTargets(
        head_ids=stats.head_ids[..., :top_k].astype(jnp.int32),
        head_logp=head_logp[..., :top_k],
        log_alpha=(log_alpha_max if top_k == k_max
                   else jnp.logaddexp(log_alpha_max, _lse(extra_logp))),
        tail_plogp=plogp_max + _xlogx_sum(extra_logp),
        tail_ids=jnp.concatenate([stats.head_ids[..., top_k:].astype(jnp.int32),
                                  stats.sample_ids.astype(jnp.int32)], axis=-1),
        tail_mass=jnp.concatenate([jnp.exp(extra_logp),
                                   jnp.broadcast_to(sample_mass, stats.sample_ids.shape)], -1),
    )


# ----------------------------------------------------------------------------------------------
# Per-position pieces
# ----------------------------------------------------------------------------------------------


def student_log_normalisers(s_btv, head_ids_btk):
    """(logsumexp over V, logsumexp over the tail) of scaled student logits, in log space."""
    tail_btv = jnp.where(head_mask(head_ids_btk, s_btv.shape[-1]), -jnp.inf, s_btv)
    return _lse(s_btv), _lse(tail_btv)


def _gather(s_btv, ids_btk):
    return jnp.take_along_axis(jnp.maximum(s_btv, -_FLOOR), ids_btk, axis=-1)


def head_term(s_btv, lse_s_bt, t: TailTargets):
    """Σ_I p_T (log p_T − log p_S) over the cached head."""
    p_btk = jnp.exp(t.head_logp)
    diff_btk = t.head_logp - (_gather(s_btv, t.head_ids) - lse_s_bt[..., None])
    return jnp.sum(jnp.where(p_btk > 0, p_btk * diff_btk, 0.0), axis=-1)


def bucket_term(log_alpha_t_bt, log_alpha_s_bt):
    """α_T (log α_T − log α_S): the (K+1)-th bucket of D_KL1; 0 when α_T = 0."""
    has = jnp.isfinite(log_alpha_t_bt)
    lat = jnp.where(has, log_alpha_t_bt, 0.0)
    return jnp.where(has, jnp.exp(lat) * (lat - log_alpha_s_bt), 0.0)


def tail_cross(s_btv, lse_tail_s_bt, t: TailTargets):
    """Σ_m w_m log p̃_S(id_m): unbiased for Σ_tail p_T log p̃_S (= α_T E_{p̃_T}[log p̃_S])."""
    lp_btm = _gather(s_btv, t.tail_ids) - lse_tail_s_bt[..., None]
    return jnp.sum(jnp.where(t.tail_mass > 0, t.tail_mass * lp_btm, 0.0), axis=-1)


def tail_constant(t: TailTargets):
    """α_T·Σ_tail p̃_T log p̃_T = Σ_tail p_T log p_T − α_T log α_T (exact; 0 when α_T = 0)."""
    has = jnp.isfinite(t.log_alpha)
    lat = jnp.where(has, t.log_alpha, 0.0)
    return jnp.where(has, t.tail_plogp - jnp.exp(lat) * lat, 0.0)


def beta_x(log_alpha_t_bt, mask_bt, beta: float, eps_alpha: float, beta_scope: str = "row",
           segment_ids=None):
    """β(X) = β / max(ᾱ(X), eps_alpha) at every position `[..., T]`, ᾱ(X) the mean α_T over the
    valid positions of X: the row ("row"), or its document ("segment", by `segment_ids`
    `[..., T]`). The one kernel's `tad_core.beta_x` (Eq. 3).

    Raises:
      ValueError: an unknown beta_scope, or "segment" without segment_ids of shape `[..., T]`.
    """
    cfg = tad_core.TADConfig(top_k=0, beta=beta, eps_alpha=eps_alpha, beta_scope=beta_scope)
    if beta_scope == "segment":
        checks.segments(segment_ids, jnp.shape(mask_bt))
        segment_ids = jnp.asarray(segment_ids).astype(jnp.int32)
    return tad_core.beta_x(log_alpha_t_bt, mask_bt, cfg, segment_ids)


# ----------------------------------------------------------------------------------------------
# The loss and its gradient
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cached_per_position(student_btv, t, beta_x_bt, mask_bt, temperature):
    """τ²·(D_KL1 + β(X)·α_T·D_KL2 estimate) per position, 0 where masked; float32 `[..., T]`."""
    return _cached_fwd(student_btv, t, beta_x_bt, mask_bt, temperature)[0]


def _scaled(x, temperature):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x / temperature if temperature != 1.0 else x


def _cached_fwd(student_btv, t, beta_x_bt, mask_bt, temperature):
    s_btv = _scaled(student_btv, temperature)
    lse_s, lse_tail_s = student_log_normalisers(s_btv, t.head_ids)
    kl1 = head_term(s_btv, lse_s, t) + bucket_term(t.log_alpha, lse_tail_s - lse_s)
    tail = tail_constant(t) - tail_cross(s_btv, lse_tail_s, t)
    loss_bt = temperature**2 * (kl1 + beta_x_bt * tail)
    loss_bt = jnp.where(mask_bt > 0, loss_bt, 0.0)
    return loss_bt, (student_btv, t, beta_x_bt, mask_bt, lse_s, lse_tail_s)


def _scatter_add(ids_btk, w_btk, vocab):
    lead = ids_btk.shape[:-1]
    iotas = [jax.lax.broadcasted_iota(jnp.int32, ids_btk.shape, d) for d in range(len(lead))]
    return jnp.zeros(lead + (vocab,), w_btk.dtype).at[(*iotas, ids_btk)].add(w_btk)


def _cached_bwd(temperature, res, g_bt):
    """The exact gradient of the forward above (so of the estimate), times τ (τ²·1/τ):
    (P_I + α_T)·p_S − p_T[I] + (β(X)·W − α_T)·p̃_S[tail] − β(X)·Σ_m w_m e_{id_m},
    with P_I = Σ_I p_T and W = Σ_m w_m (both sum to 1 and α_T up to the cache's rounding)."""
    student_btv, t, beta_x_bt, mask_bt, lse_s, lse_tail_s = res
    vocab = student_btv.shape[-1]
    s_btv = jnp.maximum(_scaled(student_btv, temperature), -2 * _FLOOR)
    ps_btv = jnp.exp(s_btv - lse_s[..., None])
    is_head = head_mask(t.head_ids, vocab)
    pts_btv = jnp.where(is_head, 0.0, jnp.exp(s_btv - jnp.where(
        jnp.isfinite(lse_tail_s), lse_tail_s, 0.0)[..., None]))
    p_head = jnp.exp(t.head_logp)
    alpha_t = jnp.exp(t.log_alpha)
    bx = beta_x_bt
    coef_tail = bx * jnp.sum(t.tail_mass, axis=-1) - alpha_t
    grad_btv = ((jnp.sum(p_head, axis=-1) + alpha_t)[..., None] * ps_btv
                - _scatter_add(t.head_ids, p_head, vocab)
                + coef_tail[..., None] * pts_btv
                - bx[..., None] * _scatter_add(t.tail_ids, t.tail_mass, vocab))
    scale_bt = jnp.where(mask_bt > 0, temperature * g_bt, 0.0)
    grad_btv = jnp.where(mask_bt[..., None] > 0, scale_bt[..., None] * grad_btv, 0.0)
    return grad_btv.astype(student_btv.dtype), None, None, None


_cached_per_position.defvjp(_cached_fwd, _cached_bwd)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _positive(name, value):
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return value


def _check(student_logits, stats, mask, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if not jnp.issubdtype(jnp.result_type(student_logits), jnp.floating):
        raise ValueError(f"student_logits must be floating point, got "
                         f"{jnp.result_type(student_logits)}.")
    shape = jnp.shape(student_logits)
    if len(shape) < 2 or tuple(stats.log_alpha.shape) != tuple(shape[:-1]):
        raise ValueError(f"the cache batch covers positions {tuple(stats.log_alpha.shape)} but "
                         f"student_logits {shape} are [..., T, V] over {shape[:-1]}: read the "
                         "cache rows of this batch (same rows, same seq_len).")
    if mask is None:
        return jnp.ones(shape[:-1], jnp.float32)
    if tuple(jnp.shape(mask)) != tuple(shape[:-1]):
        raise ValueError(f"mask shape {jnp.shape(mask)} must equal {shape[:-1]} ([..., T]).")
    return (jnp.asarray(mask) != 0).astype(jnp.float32)


def _reduce(loss_bt, mask_bt, reduction):
    if reduction == "none":
        return loss_bt
    if reduction == "sum":
        return jnp.sum(loss_bt)
    return jnp.sum(loss_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def tad_divergence_cached(student_logits, cache_batch: TeacherStats, mask=None, *, top_k=10,
                          beta=2.0, temperature=1.0, eps_alpha=1e-6, reduction="mean",
                          beta_scope="row", segment_ids=None):
    """TAD's L_DIV = D_KL1 + β(X)·α_T·D_KL2 against a cached teacher (module docstring).

    D_KL1, β(X) and the tail entropy are exact; the tail cross-entropy is estimated without bias
    from the cached tail draws, so the value and the gradient (a `jax.custom_vjp`) are unbiased
    estimates of `tad_jax.tad_divergence`'s on the teacher's full logits.

    Args:
      student_logits: float `[..., T, V]` (any float dtype; math in float32).
      cache_batch: `TeacherStats` of the same positions (`[..., T, ...]`), as the cache reader
        yields them (written at this `temperature`; the reader refuses another τ).
      mask: `[..., T]` bool or 0/1, 1 = the position counts; None = all.
      top_k: K, 0 <= K <= the cache's K_max.
      beta, eps_alpha: β > 0 and the floor on ᾱ(X), as `tad_divergence`.
      temperature: τ > 0, the cache's; the loss is multiplied by τ².
      reduction: "none" (`[..., T]`, 0 where masked), "sum", or "mean" (over valid positions).
      beta_scope, segment_ids: the sequence X of Eq. 3, as `tad_divergence`: "row", or
        "segment" (a document of a packed row) with int segment_ids `[..., T]`.

    Returns:
      float32 scalar, or `[..., T]` for reduction="none".

    Raises:
      ValueError: mismatched shapes, K out of range, β/τ/eps_alpha <= 0, unknown reduction or
        beta_scope, "segment" without segment_ids.
    """
    mask_bt = _check(student_logits, cache_batch, mask, reduction)
    beta, temperature = _positive("beta", beta), _positive("temperature", temperature)
    eps_alpha = _positive("eps_alpha", eps_alpha)
    targets = read_top_k(cache_batch, top_k)
    beta_x_bt = beta_x(targets.log_alpha, mask_bt, beta, eps_alpha, beta_scope, segment_ids)
    loss_bt = _cached_per_position(student_logits, targets, beta_x_bt, mask_bt, temperature)
    return _reduce(loss_bt, mask_bt, reduction)


def kl_divergence_cached(student_logits, cache_batch: TeacherStats, mask=None, *,
                         temperature=1.0, reduction="mean"):
    """Vanilla KD's KL(p_T || p_S) against a cached teacher: KL = D_KL1 + α_T·D_KL2 at the cache's
    K_max (the most exact entries, the least variance), with the same tail estimator.

    Arguments, returns and errors as `tad_divergence_cached` (without K, β, eps_alpha).
    """
    mask_bt = _check(student_logits, cache_batch, mask, reduction)
    temperature = _positive("temperature", temperature)
    targets = read_top_k(cache_batch, cache_batch.head_ids.shape[-1])
    ones_bt = jnp.ones(mask_bt.shape, jnp.float32)
    loss_bt = _cached_per_position(student_logits, targets, ones_bt, mask_bt, temperature)
    return _reduce(loss_bt, mask_bt, reduction)


_CACHED_DIVERGENCES = ("tad", "kl")


def check_loss_config(loss_cfg) -> None:
    """Raises unless the run's `loss` section can be computed from a teacher cache.

    Raises:
      ValueError: a divergence other than TAD / KL, or the cosine term (they need the teacher's
        full logits or hidden states, which a cache does not keep).
    """
    if loss_cfg.divergence not in _CACHED_DIVERGENCES:
        raise ValueError(f"loss.divergence={loss_cfg.divergence!r} needs the teacher's full "
                         f"distribution; a teacher cache serves {_CACHED_DIVERGENCES}. Unset "
                         "data.teacher_cache or change the divergence.")
    if loss_cfg.cosine_weight > 0:
        raise ValueError("loss.cosine_weight > 0 needs the teacher's hidden states, which the "
                         "teacher cache does not keep: set it to 0 or unset data.teacher_cache.")


def cached_distillation_loss(student_out, batch: dict, loss_cfg, student_cfg, params,
                             vocab_size: int):
    """Eq. 4 summed over the batch's valid positions, the divergence from its cached teacher:
    (total, {"clm", "div", "cosine"}) like `tad_jax.losses.distillation_loss(reduction="sum")`
    (cosine is 0; see `check_loss_config`). With `loss_cfg.fused` the student's head is applied
    in token chunks (`teacher_cache.fused`) and no [B, T, V] logits exist.

    Args:
      student_out: the student's `DecoderOutput` (`.logits`, or `.hidden_states` when fused).
      batch: a cached batch (`reader.CACHE_KEYS` beside `targets` and `loss_mask`).
      loss_cfg: the run config's `loss` section.
      student_cfg, params: the student's ModelConfig and params (the head, when fused).
      vocab_size: the vocabulary entries compared (the cache's V).
    """
    from tad_jax.losses import causal_lm_loss
    from tad_jax.teacher_cache.reader import cache_batch

    check_loss_config(loss_cfg)
    stats, mask = cache_batch(batch), batch["loss_mask"]
    if loss_cfg.fused:
        from tad_jax.models import lm_head
        from tad_jax.teacher_cache.fused import fused_cached_loss

        w_dv, b_v = lm_head(student_cfg, params)
        clm, div = fused_cached_loss(
            student_out.hidden_states, w_dv[:, :vocab_size], stats, batch["targets"], mask,
            divergence=loss_cfg.divergence, top_k=int(loss_cfg.top_k), beta=loss_cfg.beta,
            temperature=loss_cfg.temperature, eps_alpha=loss_cfg.eps_alpha,
            beta_scope=loss_cfg.get("beta_scope", "row"), segment_ids=batch.get("segment_ids"),
            bias_v=None if b_v is None else b_v[:vocab_size],
            final_logit_softcap=student_cfg.final_logit_softcap,
            chunk_size=int(loss_cfg.chunk_size))
        return clm + div, {"clm": clm, "div": div, "cosine": jnp.zeros_like(clm)}
    student_logits, reduction = student_out.logits[..., :vocab_size], "sum"
    clm = causal_lm_loss(student_logits, batch["targets"], mask, reduction)
    if loss_cfg.divergence == "tad":
        div = tad_divergence_cached(student_logits, stats, mask, top_k=int(loss_cfg.top_k),
                                    beta=loss_cfg.beta, temperature=loss_cfg.temperature,
                                    eps_alpha=loss_cfg.eps_alpha, reduction=reduction,
                                    beta_scope=loss_cfg.get("beta_scope", "row"),
                                    segment_ids=batch.get("segment_ids"))
    else:
        div = kl_divergence_cached(student_logits, stats, mask,
                                   temperature=loss_cfg.temperature, reduction=reduction)
    return clm + div, {"clm": clm, "div": div, "cosine": jnp.zeros_like(clm)}
