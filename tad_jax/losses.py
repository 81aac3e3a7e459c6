"""Distillation losses: TAD (Tail-Aware Distillation) with its analytic gradient, and companions.

Definitions follow `../shared/TAD_SPEC.md` (paper: arXiv 2602.20816, Sec. 2 and App. A).

Shape convention: logits are `[..., T, V]`; a *row* is one index of the leading dims (one training
sequence). Names carry suffixes: `_btv` = [..., T, V], `_bt` = [..., T], `_btk` = [..., T, K],
`_b` = [...] (one value per row); `...` may be any number of leading dims, including none.

Conventions shared by every divergence here:
- `mask` `[..., T]` (bool or 0/1; None = all valid). Any non-zero entry counts as valid.
- Temperature τ: probabilities are softmax(logits / τ) and the divergence is multiplied by τ²
  (Hinton's convention), so gradient magnitudes do not shrink with τ.
- `reduction`: "none" → `[..., T]` float32 with 0 at masked positions; "sum"; "mean" → the sum
  divided by the number of valid positions of the whole (global) batch (0 when there is none).
- Math is float32 inside whatever the input dtype (float64 if given float64); gradients come back
  in the input dtype.
- The teacher is a constant: its logits get a zero cotangent (distillation never trains it).
- Config arguments (`top_k`, `beta`, `temperature`, `eps_alpha`, `reduction`, ...) are static
  Python numbers/strings: they are checked at trace time, so bad values cost nothing at run time.
"""

import functools
import math

import jax
import jax.numpy as jnp

from tad_jax import checks
from tad_jax import tad_core as core

_DIVERGENCES = ("tad", "kl", "rkl", "jsd")


# ----------------------------------------------------------------------------------------------
# Masks and reductions (argument checks: `tad_jax.checks`)
# ----------------------------------------------------------------------------------------------


def _mask_bt(mask, positions_shape):
    """The validity mask as float32 0/1 of `positions_shape` (all ones when None)."""
    if mask is None:
        return jnp.ones(positions_shape, jnp.float32)
    checks.per_position("mask", mask, positions_shape, " (the logits' leading shape)")
    return (jnp.asarray(mask) != 0).astype(jnp.float32)


def _masked(x_bt, mask_bt):
    """x where the mask is set, else 0: a select, so an inf/NaN at a masked position (e.g. a
    target on a -inf padding entry) cannot leak, and the mask's float32 never demotes float64."""
    return jnp.where(mask_bt > 0, x_bt, jnp.zeros((), x_bt.dtype))


def _reduce(loss_bt, mask_bt, reduction):
    """Applies the reduction to a per-position loss that is already 0 at masked positions."""
    if reduction == "none":
        return loss_bt
    total = jnp.sum(loss_bt)
    if reduction == "sum":
        return total
    count = jnp.sum(mask_bt)
    return total / jnp.maximum(count, 1.0)


def _scaled(x, temperature):
    """logits/τ in float32, or in float64 when given float64 (the exactness tests use it)."""
    x = core.widen(x)
    return x / temperature if temperature != 1.0 else x


# ----------------------------------------------------------------------------------------------
# TAD and KL: one custom_vjp around the kernel of tad_core (KL is its K = 0, β = 1 case)
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _divergence_bt(student_btv, teacher_btv, mask_bt, segment_ids_bt, cfg, padding):
    """τ²·L_DIV per position, 0 where masked; float32 `[..., T]`. `padding`: see
    `tad_divergence`'s student_padding."""
    return _divergence_fwd(student_btv, teacher_btv, mask_bt, segment_ids_bt, cfg, padding)[0]


def _divergence_fwd(student_btv, teacher_btv, mask_bt, segment_ids_bt, cfg, padding):
    head, terms = core.pair_terms(student_btv, teacher_btv, cfg.top_k, cfg.temperature,
                                  padding)
    beta_bt = core.beta_x(terms.log_alpha_t, mask_bt, cfg, segment_ids_bt)
    loss_bt = terms.kl1 + beta_bt * jnp.exp(terms.log_alpha_t) * terms.kl2
    loss_bt = _masked(cfg.temperature**2 * loss_bt, mask_bt)
    # Residuals: the inputs (alive anyway), the head ([.., K] + 2 per position) and per-position
    # scalars; the backward pass recomputes the softmaxes from the logits (no [.., V] residual).
    return loss_bt, (student_btv, teacher_btv, mask_bt, head, terms, beta_bt - 1.0)


def _divergence_bwd(cfg, padding, res, g_bt):
    """Eq. 6 times τ (τ² · ∂/∂(s/τ)); zero cotangents for the teacher, the mask and the ids."""
    student_btv, teacher_btv, mask_bt, head, terms, gamma_bt = res
    a_btv, b_btv = core.tempered_pair(student_btv, teacher_btv, cfg.temperature, padding)
    grad_btv = _tad_eq6_grad(a_btv, b_btv, head, terms, gamma_bt)
    grad_btv = _masked((cfg.temperature * g_bt)[..., None] * grad_btv, mask_bt[..., None])
    return grad_btv.astype(student_btv.dtype), jnp.zeros_like(teacher_btv), None, None


@jax.jit
def _tad_eq6_grad(a_btv, b_btv, head, terms, gamma_bt):
    """`tad_core.token_grad`, jitted so that its name shows in the jaxpr of `jax.grad` (the
    tests check that this rule, not autodiff, makes the gradient)."""
    return core.token_grad(a_btv, b_btv, head, terms, gamma_bt)


_divergence_bt.defvjp(_divergence_fwd, _divergence_bwd)


def _segments(segment_ids, cfg, shape):
    if cfg.beta_scope != "segment":
        return None
    checks.segments(segment_ids, shape)
    return jnp.asarray(segment_ids).astype(jnp.int32)


def tad_divergence(student_logits, teacher_logits, mask=None, *, top_k=10, beta=2.0,
                   temperature=1.0, eps_alpha=1e-6, reduction="mean", beta_scope="row",
                   segment_ids=None, config=None, student_padding=True):
    """Tail-Aware Distillation divergence L_DIV = D_KL1 + β(X)·α_T·D_KL2 (paper Eq. 3).

    The gradient is the paper's closed form (Eq. 6) through a `jax.custom_vjp`; the teacher logits
    get a zero cotangent. Ties at the K-th place go to the lowest vocabulary index. An entry where
    the student is -inf (a padded vocabulary) is dropped from both distributions (`tad_core`).
    A valid position with no entry left (all -inf) adds 0, gets a 0 gradient and counts with
    α_T = 0 in ᾱ(X); mask it out to leave ᾱ(X) alone.

    Args:
      student_logits: float `[..., T, V]` (any float dtype; math in float32).
      teacher_logits: float `[..., T, V]`, same shape.
      mask: `[..., T]` bool or 0/1, 1 = the position counts; None = all positions count.
      top_k: K, size of the teacher's head I; 0 <= K < V (K = 0 gives KL scaled by β(X)).
      beta: β > 0; β(X) = β / max(ᾱ(X), eps_alpha) with ᾱ(X) the sequence's mean tail mass.
      temperature: τ > 0; softmax(logits/τ), loss multiplied by τ².
      eps_alpha: floor on ᾱ(X) (> 0), keeps β(X) finite when a sequence's tail mass is ~0.
      reduction: "none" (`[..., T]`, 0 where masked), "sum", or "mean" (over valid positions).
      beta_scope: "row" (X = a row) or "segment" (X = a document of a packed row).
      segment_ids: int `[..., T]`, the document of each position (needed for "segment").
      config: a `TADConfig`, used instead of top_k/beta/temperature/eps_alpha/beta_scope.
      student_padding: True: an entry where the student logit is -inf (a padded vocabulary) is
        dropped from both distributions. False: the caller guarantees finite student logits
        (e.g. a model's head without a -inf bias; the training step's), and nothing is merged:
        a -inf student entry where the teacher has mass then gives +inf (the true KL). It spares
        the teacher's top-K a merged copy where XLA's TopK takes it (on TPU at τ != 1: TopK
        does not fuse its producer, so the merge costs a written and re-read copy; jax.grad
        TAD/KL bytes on a TPU v5p compile 1.29x with, 1.14x without); at τ = 1 the TPU kernel
        merges in VMEM (0.72-0.73x either way; `scripts/bench_loss.py`).

    Returns:
      float32 loss: scalar, or `[..., T]` for reduction="none".

    Raises:
      ValueError: on mismatched shapes, integer logits, K out of range, β/τ/eps_alpha <= 0, an
        unknown reduction or beta_scope, or "segment" without segment_ids.
    """
    cfg = config or core.TADConfig(top_k, beta, temperature, eps_alpha, beta_scope)
    checks.reduction(reduction)
    checks.logits_pair(student_logits, teacher_logits)
    cfg.check_vocab(jnp.shape(student_logits)[-1])
    mask_bt = _mask_bt(mask, jnp.shape(student_logits)[:-1])
    seg_bt = _segments(segment_ids, cfg, jnp.shape(student_logits)[:-1])
    loss_bt = _divergence_bt(student_logits, teacher_logits, mask_bt, seg_bt, cfg,
                             bool(student_padding))
    return _reduce(loss_bt, mask_bt, reduction)


def tad_components(student_logits, teacher_logits, mask=None, *, top_k=10, beta=2.0,
                   temperature=1.0, eps_alpha=1e-6, beta_scope="row", segment_ids=None):
    """The pieces of TAD, for diagnostics and evaluation (no gradient; not scaled by τ²).

    Args:
      student_logits, teacher_logits, mask, top_k, beta, temperature, eps_alpha, beta_scope,
        segment_ids: as for `tad_divergence`.

    Returns:
      dict of float32 arrays: "kl1", "kl2", "alpha_t", "alpha_s", "kl" (= kl1 + alpha_t·kl2), each
      `[..., T]` with 0 at masked positions, and "beta_x" `[..., T]` (β(X) at each position).

    Raises:
      ValueError: as `tad_divergence`.
    """
    cfg = core.TADConfig(top_k, beta, temperature, eps_alpha, beta_scope)
    checks.logits_pair(student_logits, teacher_logits)
    cfg.check_vocab(jnp.shape(student_logits)[-1])
    mask_bt = _mask_bt(mask, jnp.shape(student_logits)[:-1])
    seg_bt = _segments(segment_ids, cfg, jnp.shape(student_logits)[:-1])
    _, terms = core.pair_terms(jax.lax.stop_gradient(student_logits),
                               jax.lax.stop_gradient(teacher_logits), cfg.top_k, cfg.temperature)
    out = dict(kl1=terms.kl1, kl2=terms.kl2, alpha_t=jnp.exp(terms.log_alpha_t),
               alpha_s=jnp.exp(terms.log_alpha_s), kl=terms.kl)
    out = {k: _masked(v, mask_bt) for k, v in out.items()}
    out["beta_x"] = core.beta_x(terms.log_alpha_t, mask_bt, cfg, seg_bt)
    return out


def kl_divergence(student_logits, teacher_logits, mask=None, *, temperature=1.0,
                  reduction="mean", student_padding=True):
    """Forward KL(p_T || p_S) (the paper's vanilla KD), with a closed-form p_S − p_T gradient.

    The TAD kernel with K = 0 and β = 1 (then L_DIV = KL exactly). With student_padding=True
    (the default), entries where the student is -inf are dropped from both distributions (padded
    vocabulary, `tad_core`).

    Args:
      student_logits, teacher_logits: float `[..., T, V]` of equal shape.
      mask: `[..., T]` bool or 0/1; None = all valid.
      temperature: τ > 0; the divergence is multiplied by τ².
      reduction: "none", "sum" or "mean" (module docstring).
      student_padding: as `tad_divergence` (False: finite student logits guaranteed).

    Returns:
      float32 scalar, or `[..., T]` for reduction="none".

    Raises:
      ValueError: on mismatched shapes, integer logits, τ <= 0 or an unknown reduction.
    """
    cfg = core.TADConfig(top_k=0, beta=1.0, temperature=temperature)
    checks.reduction(reduction)
    checks.logits_pair(student_logits, teacher_logits)
    mask_bt = _mask_bt(mask, jnp.shape(student_logits)[:-1])
    loss_bt = _divergence_bt(student_logits, teacher_logits, mask_bt, None, cfg,
                             bool(student_padding))
    return _reduce(loss_bt, mask_bt, reduction)


# ----------------------------------------------------------------------------------------------
# Companion divergences
# ----------------------------------------------------------------------------------------------


def _common_args(student_logits, teacher_logits, mask, temperature, reduction):
    checks.reduction(reduction)
    checks.logits_pair(student_logits, teacher_logits)
    mask_bt = _mask_bt(mask, jnp.shape(student_logits)[:-1])
    return mask_bt, checks.positive("temperature", temperature)


def _xlogy_diff(p_btv, logp_btv, logq_btv):
    """Σ p·(log p − log q) with 0·(anything) = 0, so -inf padding entries give 0, not NaN."""
    # The where sits inside the product so that autodiff never multiplies 0 by a NaN partial.
    return jnp.sum(p_btv * jnp.where(p_btv > 0, logp_btv - logq_btv, 0.0), axis=-1)


def _autodiff_log_probs(student_btv, teacher_btv, mask_bt, temperature):
    """log p_S, log p_T (teacher constant) for the losses differentiated by plain autodiff.

    Masked positions are replaced by zeros first: a padded position may hold all -inf logits,
    whose logsumexp has a NaN partial that autodiff would multiply by the zero cotangent. So are
    valid positions where the student has no finite entry (nothing left of either distribution):
    they give 0 and a 0 gradient.
    """
    s_btv, t_btv = core.tempered_pair(student_btv, jax.lax.stop_gradient(teacher_btv),
                                      temperature)
    keep = (mask_bt[..., None] > 0) & jnp.any(s_btv > -jnp.inf, axis=-1, keepdims=True)
    s_btv, t_btv = jnp.where(keep, s_btv, 0.0), jnp.where(keep, t_btv, 0.0)
    return core.log_softmax(s_btv), core.log_softmax(t_btv)


def reverse_kl_divergence(student_logits, teacher_logits, mask=None, *, temperature=1.0,
                          reduction="mean"):
    """Reverse KL(p_S || p_T) (mode seeking). Arguments, returns and errors as `kl_divergence`.

    A student -inf entry is dropped from both distributions (padded vocabulary). A teacher -inf
    where the student has mass gives +inf (correct) with a finite gradient, never NaN: that of
    RKL against a teacher with the smallest normal float probability on the entry.
    """
    mask_bt, temperature = _common_args(student_logits, teacher_logits, mask, temperature,
                                        reduction)
    lps_btv, lpt_btv = _autodiff_log_probs(student_logits, teacher_logits, mask_bt, temperature)
    ps_btv = jnp.exp(lps_btv)
    # Where the teacher is -inf and the student is not, RKL is +inf and its true gradient is
    # infinite: the gradient used is that of RKL against a teacher putting the smallest normal
    # float (log ≈ -87.3 in float32) there instead, finite and pushing the student off the entry.
    floor = math.log(jnp.finfo(lpt_btv.dtype).tiny)
    lpt_grad_btv = jnp.where(jnp.isneginf(lpt_btv), floor, lpt_btv)
    rkl_bt = _xlogy_diff(ps_btv, lps_btv, lpt_grad_btv)
    exact_bt = jax.lax.stop_gradient(_xlogy_diff(ps_btv, lps_btv, lpt_btv))
    rkl_bt = rkl_bt + (exact_bt - jax.lax.stop_gradient(rkl_bt))  # the value stays exact (+inf)
    return _reduce(_masked(temperature**2 * rkl_bt, mask_bt), mask_bt, reduction)


def _log_mixture(lpt_btv, lps_btv, w):
    """log(w·p_T + (1 − w)·p_S) by logaddexp: exact where one probability underflows."""
    # Entries where both are -inf (padding) go through logaddexp as 0s: its partials at (-inf,
    # -inf) are NaN, which would leak into the gradient even behind a where.
    both_inf = jnp.isneginf(lpt_btv) & jnp.isneginf(lps_btv)
    a_btv = jnp.where(both_inf, 0.0, math.log(w) + lpt_btv)
    b_btv = jnp.where(both_inf, 0.0, math.log1p(-w) + lps_btv)
    return jnp.where(both_inf, -jnp.inf, jnp.logaddexp(a_btv, b_btv))


def js_divergence(student_logits, teacher_logits, mask=None, *, weight=0.5, temperature=1.0,
                  reduction="mean"):
    """Generalised Jensen-Shannon divergence with mixing weight w.

    JSD_w = w·KL(p_T || M) + (1 − w)·KL(p_S || M), M = w·p_T + (1 − w)·p_S; w = 0.5 is the usual
    symmetric JSD (bounded by log 2).

    Args:
      weight: w, strictly between 0 and 1. Other arguments as `kl_divergence`.

    Returns:
      float32 scalar, or `[..., T]` for reduction="none".

    Raises:
      ValueError: as `kl_divergence`, or when weight is not in (0, 1).
    """
    mask_bt, temperature = _common_args(student_logits, teacher_logits, mask, temperature,
                                        reduction)
    w = checks.static_number("weight", weight)
    if not 0.0 < w < 1.0:
        raise ValueError(f"weight (the JSD mixing weight) must be in (0, 1), got {w}.")
    lps_btv, lpt_btv = _autodiff_log_probs(student_logits, teacher_logits, mask_bt, temperature)
    lm_btv = _log_mixture(lpt_btv, lps_btv, w)
    jsd_bt = (w * _xlogy_diff(jnp.exp(lpt_btv), lpt_btv, lm_btv)
              + (1.0 - w) * _xlogy_diff(jnp.exp(lps_btv), lps_btv, lm_btv))
    return _reduce(_masked(temperature**2 * jsd_bt, mask_bt), mask_bt, reduction)


# ----------------------------------------------------------------------------------------------
# CLM, hidden-state cosine, and the training objective
# ----------------------------------------------------------------------------------------------


def causal_lm_loss(logits, targets, mask=None, reduction="mean"):
    """Cross-entropy of the next token: −log softmax(logits)[target] per position.

    Args:
      logits: float `[..., T, V]`.
      targets: int `[..., T]`, the next token at each position (already shifted).
      mask: `[..., T]` bool or 0/1; None = all valid.
      reduction: "none", "sum" or "mean".

    Returns:
      float32 scalar, or `[..., T]` for reduction="none".

    Raises:
      ValueError: on integer logits, float targets, mismatched shapes or an unknown reduction.
    """
    checks.reduction(reduction)
    checks.floating("logits", logits)
    if jnp.shape(logits)[:-1] != jnp.shape(targets) or len(jnp.shape(logits)) < 2:
        raise ValueError(
            f"targets shape {jnp.shape(targets)} must equal logits shape without the vocabulary "
            f"axis ({jnp.shape(logits)[:-1]}); logits must be [..., T, V]."
        )
    checks.ids("targets", targets, "token ids")
    mask_bt = _mask_bt(mask, jnp.shape(targets))
    # Masked positions are zeroed first, as in `_autodiff_log_probs`: an all -inf (padded) row's
    # logsumexp has a NaN partial that autodiff would multiply by the zero cotangent.
    logits = jnp.where(mask_bt[..., None] > 0, logits, jnp.zeros((), jnp.result_type(logits)))
    lp_btv = core.log_softmax(logits)
    tgt_lp_bt = core.at_targets(lp_btv, targets)
    loss_bt = _masked(-tgt_lp_bt, mask_bt)
    return _reduce(loss_bt, mask_bt, reduction)


def cosine_hidden_loss(student_hidden, teacher_hidden, mask=None, reduction="mean"):
    """1 − cos(h_S, h_T) per position (Sec. 3.2.2), teacher hidden states held constant.

    Args:
      student_hidden: float `[..., T, d]`.
      teacher_hidden: float `[..., T, d]`, same hidden size d.
      mask: `[..., T]` bool or 0/1; None = all valid.
      reduction: "none", "sum" or "mean".

    Returns:
      float32 scalar, or `[..., T]` for reduction="none".

    Raises:
      ValueError: on unequal hidden sizes (project one side first), mismatched positions or an
        unknown reduction.
    """
    checks.reduction(reduction)
    checks.floating("student_hidden", student_hidden)
    checks.floating("teacher_hidden", teacher_hidden)
    hs, ht = jnp.shape(student_hidden), jnp.shape(teacher_hidden)
    if len(hs) < 2 or len(hs) != len(ht) or hs[:-1] != ht[:-1]:
        raise ValueError(f"hidden states must both be [..., T, d] over the same positions, got "
                         f"student {hs} and teacher {ht}.")
    if hs[-1] != ht[-1]:
        raise ValueError(
            f"hidden sizes differ (student d={hs[-1]}, teacher d={ht[-1]}): the cosine loss needs "
            "equal hidden sizes; project the student's hidden states to the teacher's size "
            "(a learned linear map) or use cosine_weight=0."
        )
    mask_bt = _mask_bt(mask, hs[:-1])
    hs_btd = _scaled(student_hidden, 1.0)
    ht_btd = _scaled(jax.lax.stop_gradient(teacher_hidden), 1.0)
    # eps inside the norms keeps an all-zero (padding) vector finite with a finite gradient.
    dot_bt = jnp.sum(hs_btd * ht_btd, axis=-1)
    norms_bt = jnp.sqrt(jnp.sum(hs_btd**2, -1) + 1e-12) * jnp.sqrt(jnp.sum(ht_btd**2, -1) + 1e-12)
    loss_bt = _masked(1.0 - dot_bt / norms_bt, mask_bt)
    return _reduce(loss_bt, mask_bt, reduction)


def distillation_loss(student_logits, teacher_logits, targets, mask, *, divergence="tad",
                      top_k=10, beta=2.0, temperature=1.0, eps_alpha=1e-6, jsd_weight=0.5,
                      cosine_weight=0.0, student_hidden=None, teacher_hidden=None,
                      reduction="mean", beta_scope="row", segment_ids=None,
                      student_padding=True):
    """The training objective (Eq. 4): L_CLM + L_DIV (+ cosine_weight · cosine hidden loss).

    Args:
      student_logits, teacher_logits: float `[..., T, V]`.
      targets: int `[..., T]` next tokens; mask: `[..., T]` (None = all valid).
      divergence: "tad", "kl", "rkl" or "jsd".
      top_k, beta, eps_alpha: TAD's settings; jsd_weight: the JSD mixing weight.
      temperature: τ for the divergence (the CLM term is always at τ = 1).
      cosine_weight: λ >= 0 of the hidden-state cosine term; > 0 needs both hidden states.
      student_hidden, teacher_hidden: `[..., T, d]` final hidden states, or None.
      reduction: "none", "sum" or "mean", applied to every part.
      beta_scope, segment_ids: TAD's sequence X of Eq. 3 (see `tad_divergence`).
      student_padding: see `tad_divergence` (tad and kl; rkl and jsd always drop such entries).

    Returns:
      (total, {"clm": ..., "div": ..., "cosine": ...}); "cosine" is 0 when cosine_weight is 0.

    Raises:
      ValueError: on an unknown divergence, a negative cosine_weight, missing hidden states, or any
        error of the parts.
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {_DIVERGENCES}, got {divergence!r}.")
    cosine_weight = checks.static_number("cosine_weight", cosine_weight)
    if cosine_weight < 0:
        raise ValueError(f"cosine_weight must be >= 0, got {cosine_weight}.")
    clm = causal_lm_loss(student_logits, targets, mask, reduction)
    common = dict(temperature=temperature, reduction=reduction)
    if divergence == "tad":
        div = tad_divergence(student_logits, teacher_logits, mask, top_k=top_k, beta=beta,
                             eps_alpha=eps_alpha, beta_scope=beta_scope, segment_ids=segment_ids,
                             student_padding=student_padding, **common)
    elif divergence == "kl":
        div = kl_divergence(student_logits, teacher_logits, mask, student_padding=student_padding,
                            **common)
    elif divergence == "rkl":
        div = reverse_kl_divergence(student_logits, teacher_logits, mask, **common)
    else:
        div = js_divergence(student_logits, teacher_logits, mask, weight=jsd_weight, **common)
    if cosine_weight > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("cosine_weight > 0 needs student_hidden and teacher_hidden "
                             "(request output_hidden_states from both models).")
        cos = cosine_hidden_loss(student_hidden, teacher_hidden, mask, reduction)
    else:
        cos = jnp.zeros_like(clm)
    return clm + div + cosine_weight * cos, {"clm": clm, "div": div, "cosine": cos}
