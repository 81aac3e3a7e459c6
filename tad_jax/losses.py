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

_REDUCTIONS = ("none", "sum", "mean")
_DIVERGENCES = ("tad", "kl", "rkl", "jsd")


# ----------------------------------------------------------------------------------------------
# Argument checks (trace time, Python level)
# ----------------------------------------------------------------------------------------------


def _static_number(name, value):
    """Returns `value` as a Python float, or raises if it is a traced/array value."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            f"{name} must be a static Python number (it configures the loss at trace time); "
            f"got {type(value).__name__}. Pass a float, not a traced jax value."
        ) from e


def _check_positive(name, value):
    value = _static_number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return value


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


def _check_float(name, x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"{name} must be floating point (got {jnp.result_type(x)}); cast them with "
            f".astype(jnp.float32) — integer logits are almost always token ids passed by mistake."
        )


def _check_pair(student_btv, teacher_btv):
    """Checks that student and teacher logits are float `[..., T, V]` arrays of equal shape."""
    _check_float("student_logits", student_btv)
    _check_float("teacher_logits", teacher_btv)
    s_shape, t_shape = jnp.shape(student_btv), jnp.shape(teacher_btv)
    if len(s_shape) < 2:
        raise ValueError(f"logits must be [..., T, V] (at least 2-D), got shape {s_shape}.")
    if len(s_shape) != len(t_shape):
        raise ValueError(
            f"student logits {s_shape} and teacher logits {t_shape} have different ranks; "
            "both must be [..., T, V] with the same leading dims."
        )
    if s_shape[-1] != t_shape[-1]:
        raise ValueError(
            f"vocabulary axis (-1) differs: student V={s_shape[-1]}, teacher V={t_shape[-1]}. "
            "Slice the teacher's (padded) vocabulary to the shared tokenizer's: "
            "teacher_logits[..., :student_vocab_size]."
        )
    for axis, (a, b) in enumerate(zip(s_shape, t_shape, strict=True)):
        if a != b:
            what = "time" if axis == len(s_shape) - 2 else "batch"
            raise ValueError(
                f"{what} axis {axis} differs: student {s_shape} vs teacher {t_shape}; "
                "student and teacher logits must cover the same positions."
            )


def _mask_bt(mask, positions_shape):
    """The validity mask as float32 0/1 of `positions_shape` (all ones when None)."""
    if mask is None:
        return jnp.ones(positions_shape, jnp.float32)
    if tuple(jnp.shape(mask)) != tuple(positions_shape):
        raise ValueError(
            f"mask shape {jnp.shape(mask)} must equal the logits' leading shape {positions_shape} "
            "([..., T]: one entry per position)."
        )
    return (jnp.asarray(mask) != 0).astype(jnp.float32)


def _check_top_k(top_k, vocab):
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k must be a Python int, got {top_k!r}.")
    if top_k < 0 or top_k >= vocab:
        raise ValueError(
            f"top_k must satisfy 0 <= top_k < V={vocab} (the tail must be non-empty), "
            f"got {top_k}."
        )


# ----------------------------------------------------------------------------------------------
# Shared numerics
# ----------------------------------------------------------------------------------------------


def _lse(x_btv):
    """logsumexp over the last axis; a row that is all -inf gives -inf (not NaN)."""
    m_bt = jnp.max(x_btv, axis=-1)
    m_bt = jnp.where(jnp.isfinite(m_bt), m_bt, 0.0)
    return jnp.log(jnp.sum(jnp.exp(x_btv - m_bt[..., None]), axis=-1)) + m_bt


def _whole_vocab(x_btv):
    """x with its vocabulary axis unsharded, for ops that need every entry of a row at once.

    Under explicit sharding (the default axis type of `jax.make_mesh`) `top_k` and gathers along a
    sharded axis are type errors; auto-sharded arrays are left to the partitioner.
    """
    sharding = jax.typeof(x_btv).sharding
    spec = getattr(sharding, "spec", None)
    if spec is None or len(spec) != x_btv.ndim or spec[-1] is None:
        return x_btv
    whole = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:-1], None))
    return jax.sharding.reshard(x_btv, whole)


def _head_u8(idx_btk, vocab):
    """uint8 [..., T, V] top-K indicator (1 = in the head), scattered from the indices.

    One zero-fill plus N·K writes. Comparing every entry against the K indices instead costs K
    compares per entry in each pass that needs the mask, and XLA CPU widens a boolean mask read by
    several reductions into a float32 [.., V] copy (both measured slower).
    """
    lead = idx_btk.shape[:-1]
    iotas = [jax.lax.broadcasted_iota(jnp.int32, idx_btk.shape, d) for d in range(len(lead))]
    head = jnp.zeros(lead + (vocab,), jnp.uint8)
    return head.at[(*iotas, idx_btk)].set(1, unique_indices=True,
                                         out_sharding=_explicit_like(idx_btk))


def _explicit_like(x_btk):
    """Under explicit sharding, x's sharding with the last axis whole (scatter needs it named)."""
    sharding = jax.typeof(x_btk).sharding
    spec = getattr(sharding, "spec", None)
    if spec is None or len(spec) != x_btk.ndim or all(p is None for p in spec):
        return None
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(*spec[:-1], None))


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


def _fits_big(x):
    """x, widened to float32 when its dtype cannot hold ±2·_BIG (float16 overflows to inf there,
    and the head push / -inf clipping then give inf·0 = NaN). Autodiff casts the gradient back."""
    if float(jnp.finfo(jnp.result_type(x)).max) < 4 * _BIG:
        return jnp.asarray(x).astype(jnp.float32)
    return x


def _scaled(x, temperature):
    """logits/τ in float32, or in float64 when given float64 (the exactness tests use it)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x / temperature if temperature != 1.0 else x


# ----------------------------------------------------------------------------------------------
# TAD
# ----------------------------------------------------------------------------------------------


# Head entries are pushed down by _BIG instead of being selected out: XLA CPU runs reductions
# of plain arithmetic as fast vectorised kernels, but materialises any select/compare input to a
# reduction first (~5x slower, measured). exp(x - _BIG - shift) is exactly 0 for any real logit.
_BIG = 1e30
# Chunk sizes tried by the two-stage top-K, largest first (see _top_k).
_TOPK_CHUNKS = (256, 250, 200, 128, 125, 100, 64, 50, 32)


def _top_k(x_btv, k):
    """Exact top-k over the last axis, in two stages when V splits into chunks.

    The k largest entries lie in the k chunks with the largest maxima, so top_k runs over chunk
    maxima and then over those k chunks only: ~8x faster than `lax.top_k` on XLA CPU at V = 32000.
    Ties between equal values are broken by a fixed rule (chunk rank, then position).
    """
    # lax.top_k on bf16 becomes a full sort on XLA CPU (~70x slower, measured): it only ever sees
    # float32 (or float64); the conversions are exact, so order and ties are unchanged.
    wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
    vocab = x_btv.shape[-1]
    chunk = next((c for c in _TOPK_CHUNKS if vocab % c == 0 and vocab // c >= 4 * k), None)
    if chunk is None:
        return jax.lax.top_k(wide(x_btv), k)
    x_bnc = x_btv.reshape(*x_btv.shape[:-1], vocab // chunk, chunk)
    _, cidx_btk = jax.lax.top_k(wide(jnp.max(x_bnc, axis=-1)), k)
    cand_btkc = jnp.take_along_axis(x_bnc, cidx_btk[..., None], axis=-2)
    vals_btk, j_btk = jax.lax.top_k(wide(cand_btkc.reshape(*x_btv.shape[:-1], k * chunk)), k)
    idx_btk = jnp.take_along_axis(cidx_btk, j_btk // chunk, axis=-1) * chunk + j_btk % chunk
    return vals_btk, idx_btk


def _view(x_btv, temperature, floor=None):
    """x/τ in float32 (float64 if given float64), optionally clipped at -floor first.

    Each [.., V] reduction reads the inputs through its own view (a different floor, or none), so
    XLA shares no converted copy between them: a shared producer would be materialised as a
    float32 [.., V] array (for bf16 inputs, measured ~2x slower). Clipping at -floor (a huge
    finite number) keeps -inf padding out of products that would give NaN.
    """
    if floor is not None:
        x_btv = jnp.maximum(x_btv, jnp.asarray(-floor, x_btv.dtype))
    return _scaled(x_btv, temperature)


def _tad_stats(student_btv, teacher_btv, top_k, temperature):
    """Per-position TAD statistics (float32), unmasked.

    Returns a dict with the top-K indices `idx_btk`, `lse_s`, `lse_t` (full logsumexps),
    `lse_tail_s`, `lse_tail_t` (logsumexps over the tail, i.e. without the top-K), `log_alpha_t`,
    `log_alpha_s`, `kl1` and `kl2` (the spec's D_KL1, D_KL2), all `[..., T]` except `idx_btk`.

    Cost: top_k, a uint8 head mask, and four reductions over [.., V]. The full logsumexps come from
    the tail ones and the K gathered head logits (a sum of positives: no cancellation), and the
    teacher's tail max is its (K+1)-th largest logit. top_k and the gather read the inputs in their
    own dtype (order and values are exact), so no converted copy is made for them.
    """
    if top_k == 0:  # the tail is the whole vocabulary: alpha = 1, D_KL1 = 0, D_KL2 = KL.
        idx_btk = jnp.zeros(student_btv.shape[:-1] + (0,), jnp.int32)
        lse_tail_s = _tail_lse(student_btv, temperature)
        max_t = _scaled(jnp.max(teacher_btv, axis=-1), temperature)
        lse_tail_t, kl2 = _teacher_tail(student_btv, teacher_btv, temperature, max_t, lse_tail_s)
        return _finish_stats(idx_btk, lse_tail_s, lse_tail_t, lse_tail_s, lse_tail_t,
                             jnp.zeros_like(lse_tail_s), kl2)
    # The barrier keeps XLA CPU from fusing the indices into their consumers, which turns top_k
    # into a full [.., V] sort (~25x slower, measured).
    top_t_btk, idx_btk = jax.lax.optimization_barrier(
        _top_k(_whole_vocab(teacher_btv), top_k + 1))
    top_t_btk = _scaled(top_t_btk, temperature)
    tail_max_t, top_t_btk, idx_btk = top_t_btk[..., -1], top_t_btk[..., :-1], idx_btk[..., :-1]
    head_btv = _head_u8(idx_btk, student_btv.shape[-1])
    lse_tail_s = _tail_lse(student_btv, temperature, head_btv)
    lse_tail_t, kl2 = _teacher_tail(student_btv, teacher_btv, temperature, tail_max_t,
                                    lse_tail_s, head_btv)
    # The K head terms from gathered values: [.., K] work instead of another [.., V] pass.
    top_s_btk = _scaled(jnp.take_along_axis(_whole_vocab(student_btv), idx_btk, axis=-1),
                        temperature)
    lse_s = jnp.logaddexp(lse_tail_s, _lse(top_s_btk))
    lse_t = jnp.logaddexp(lse_tail_t, _lse(top_t_btk))
    lpt_btk = top_t_btk - lse_t[..., None]
    pt_btk = jnp.exp(lpt_btk)
    diff_btk = jnp.where(pt_btk > 0, lpt_btk - (top_s_btk - lse_s[..., None]), 0.0)
    head = jnp.sum(pt_btk * diff_btk, axis=-1)
    return _finish_stats(idx_btk, lse_s, lse_t, lse_tail_s, lse_tail_t, head, kl2)


def _push(head_btv, dtype, n):
    """n·_BIG on the head: each reduction uses its own n, so XLA shares no [.., V] product
    between them (a shared producer is materialised; the uint8 head is read by each)."""
    if head_btv is None:
        return jnp.zeros((), dtype)
    return (n * _BIG) * (head_btv * jnp.uint8(n)).astype(dtype)


def _tail_lse(student_btv, temperature, head_btv=None):
    """logsumexp over the tail of s/τ (head excluded); -inf for an empty or all -inf tail."""
    # The max runs in the input's own dtype (exact; τ > 0 keeps the order) and is scaled after.
    m_bt = jnp.max(student_btv - _push(head_btv, student_btv.dtype, 1), axis=-1)
    m_bt = _scaled(m_bt, temperature)
    empty = m_bt < -0.5 * _BIG / temperature  # only pushed-down head entries (or -inf) left
    m_bt = jnp.where(empty, 0.0, m_bt)
    s_btv = _view(student_btv, temperature)
    lse = jnp.log(jnp.sum(jnp.exp(s_btv - (m_bt[..., None] + _push(head_btv, s_btv.dtype, 2))),
                          axis=-1)) + m_bt
    return jnp.where(empty, -jnp.inf, lse)


def _teacher_tail(student_btv, teacher_btv, temperature, shift_t, lse_tail_s, head_btv=None):
    """(lse_tail_t, D_KL2) from two reductions over the teacher's tail (Σ exp, Σ exp·(t − s)).

    D_KL2 = Σ_tail p̃_T·(t − s) − lse_tail_t + lse_tail_s, with p̃_T = exp(t − lse_tail_t) and
    `shift_t` the tail max of t/τ. The second sum reads logits clipped at -_BIG, so that -inf
    padding (where p̃_T = 0) adds 0 instead of NaN; a student -inf where the teacher has mass gives
    a huge finite loss instead of inf. It is shifted by floor(shift) + 1 and rescaled after, so
    that the two sums share no [.., V] broadcast either.
    """
    shift_t = jnp.where(jnp.isfinite(shift_t), shift_t, 0.0)
    shift2_t = jnp.floor(shift_t) + 1.0
    t_btv = _view(teacher_btv, temperature)
    e_btv = jnp.exp(t_btv - (shift_t[..., None] + _push(head_btv, t_btv.dtype, 3)))
    tc_btv = _view(teacher_btv, temperature, floor=_BIG)
    sc_btv = _view(student_btv, temperature, floor=_BIG)
    e2_btv = jnp.exp(tc_btv - (shift2_t[..., None] + _push(head_btv, tc_btv.dtype, 4)))
    z_bt = jnp.sum(e_btv, axis=-1)
    cross_bt = jnp.sum(e2_btv * (tc_btv - sc_btv), axis=-1) * jnp.exp(shift2_t - shift_t)
    lse_tail_t = jnp.log(z_bt) + shift_t
    kl2 = cross_bt / jnp.where(z_bt > 0, z_bt, 1.0) - lse_tail_t + lse_tail_s
    return lse_tail_t, kl2


def _finish_stats(idx_btk, lse_s, lse_t, lse_tail_s, lse_tail_t, head, kl2):
    log_alpha_t, log_alpha_s = lse_tail_t - lse_t, lse_tail_s - lse_s
    alpha_t = jnp.exp(log_alpha_t)
    has_tail = alpha_t > 0  # alpha_T = 0: the tail terms are 0 by convention (limit x log x -> 0).
    bucket = jnp.where(has_tail, alpha_t * (log_alpha_t - log_alpha_s), 0.0)
    return dict(
        idx_btk=idx_btk, lse_s=lse_s, lse_t=lse_t, lse_tail_s=lse_tail_s, lse_tail_t=lse_tail_t,
        log_alpha_t=log_alpha_t, log_alpha_s=log_alpha_s, kl1=head + bucket,
        kl2=jnp.where(has_tail, kl2, 0.0),
    )


def _beta_x(log_alpha_t_bt, mask_bt, beta, eps_alpha):
    """β(X) = β / max(ᾱ(X), eps_alpha), ᾱ(X) the mean teacher tail mass over valid positions.

    Teacher-only, so a constant for differentiation. A row with no valid position gets β/eps_alpha,
    which multiplies only zeros.
    """
    count_b = jnp.sum(mask_bt, axis=-1)
    alpha_sum_b = jnp.sum(_masked(jnp.exp(log_alpha_t_bt), mask_bt), axis=-1)
    mean_alpha_b = alpha_sum_b / jnp.maximum(count_b, 1.0)
    return beta / jnp.maximum(mean_alpha_b, eps_alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _tad_per_position(student_btv, teacher_btv, mask_bt, top_k, beta, temperature, eps_alpha):
    """τ²·(D_KL1 + β(X)·α_T·D_KL2) per position, 0 where masked; float32 `[..., T]`."""
    loss_bt, _ = _tad_fwd(student_btv, teacher_btv, mask_bt, top_k, beta, temperature, eps_alpha)
    return loss_bt


def _tad_fwd(student_btv, teacher_btv, mask_bt, top_k, beta, temperature, eps_alpha):
    st = _tad_stats(student_btv, teacher_btv, top_k, temperature)
    beta_x_b = _beta_x(st["log_alpha_t"], mask_bt, beta, eps_alpha)
    tail_bt = jnp.exp(st["log_alpha_t"]) * st["kl2"]
    loss_bt = _masked(temperature**2 * (st["kl1"] + beta_x_b[..., None] * tail_bt), mask_bt)
    # Residuals: the inputs (alive anyway), [.., K] indices and [.., T] statistics; the softmaxes
    # are recomputed in the backward pass instead of keeping [.., V] float32 probabilities. (When
    # forward and backward share one jit, XLA may keep the 1-byte head mask instead of scattering
    # it again: N·V bytes.)
    res = (student_btv, teacher_btv, mask_bt, st["idx_btk"], st["lse_s"], st["lse_t"],
           st["lse_tail_s"], st["log_alpha_t"], beta_x_b)
    return loss_bt, res


def _tad_bwd(top_k, beta, temperature, eps_alpha, res, g_bt):
    """Eq. 6: dL/dz_S = p_S − p_T + [i ∉ I]·(β(X) − 1)·(α_T·p̃_S − p_T), times τ (from τ²·1/τ)."""
    del beta, eps_alpha
    student_btv, teacher_btv, mask_bt, idx_btk, lse_s, lse_t, lse_tail_s, log_alpha_t = res[:8]
    beta_x_b = res[8]
    # Views clipped at -2·_BIG: -inf padding gives p = 0, and no copy is shared with the forward.
    s_btv = _view(student_btv, temperature, floor=2 * _BIG)
    t_btv = _view(teacher_btv, temperature, floor=2 * _BIG)
    ps_btv = jnp.exp(s_btv - lse_s[..., None])
    pt_btv = jnp.exp(t_btv - lse_t[..., None])
    # α_T·p̃_S,i = exp(s_i − lse_tail_s + log α_T) in log space: exact when both tails are tiny.
    log_scale = jnp.where(jnp.isfinite(log_alpha_t), log_alpha_t - lse_tail_s, -jnp.inf)
    ps_tail_btv = jnp.exp(s_btv + log_scale[..., None])
    tail_btv = (beta_x_b[..., None, None] - 1.0) * (ps_tail_btv - pt_btv)
    if top_k > 0:
        # A select, not a product: α_T·p̃_S may overflow to inf on head entries.
        tail_btv = jnp.where(_head_u8(idx_btk, s_btv.shape[-1]) > 0, 0.0, tail_btv)
    grad_btv = _masked((temperature * g_bt)[..., None] * (ps_btv - pt_btv + tail_btv),
                       mask_bt[..., None]).astype(student_btv.dtype)
    return grad_btv, jnp.zeros_like(teacher_btv), jnp.zeros_like(mask_bt)


_tad_per_position.defvjp(_tad_fwd, _tad_bwd)


def _tad_args(student_logits, teacher_logits, mask, top_k, beta, temperature, eps_alpha):
    """Validates the TAD arguments; returns (mask_bt, top_k, beta, temperature, eps_alpha)."""
    _check_pair(student_logits, teacher_logits)
    mask_bt = _mask_bt(mask, jnp.shape(student_logits)[:-1])
    _check_top_k(top_k, jnp.shape(student_logits)[-1])
    beta = _check_positive("beta", beta)
    temperature = _check_positive("temperature", temperature)
    eps_alpha = _check_positive("eps_alpha", eps_alpha)
    return mask_bt, top_k, beta, temperature, eps_alpha


def tad_divergence(student_logits, teacher_logits, mask=None, *, top_k=10, beta=2.0,
                   temperature=1.0, eps_alpha=1e-6, reduction="mean"):
    """Tail-Aware Distillation divergence L_DIV = D_KL1 + β(X)·α_T·D_KL2 (paper Eq. 3).

    The gradient is the paper's closed form (Eq. 6) through a `jax.custom_vjp`; the teacher logits
    get a zero cotangent. Ties at the K-th place are broken by a fixed, deterministic rule.

    Args:
      student_logits: float `[..., T, V]` (any float dtype; math in float32).
      teacher_logits: float `[..., T, V]`, same shape. Slice a padded teacher vocabulary first.
      mask: `[..., T]` bool or 0/1, 1 = the position counts; None = all positions count.
      top_k: K, size of the teacher's head I; 0 <= K < V (K = 0 gives KL scaled by β(X)).
      beta: β > 0; β(X) = β / max(ᾱ(X), eps_alpha) with ᾱ(X) the row's mean teacher tail mass.
      temperature: τ > 0; softmax(logits/τ), loss multiplied by τ².
      eps_alpha: floor on ᾱ(X) (> 0), keeps β(X) finite when a row's tail mass is ~0.
      reduction: "none" (`[..., T]`, 0 where masked), "sum", or "mean" (over valid positions).

    Returns:
      float32 loss: scalar, or `[..., T]` for reduction="none".

    Raises:
      ValueError: on mismatched shapes, integer logits, K out of range, β/τ/eps_alpha <= 0 or an
        unknown reduction.
    """
    _check_reduction(reduction)
    mask_bt, *cfg = _tad_args(student_logits, teacher_logits, mask, top_k, beta, temperature,
                              eps_alpha)
    loss_bt = _tad_per_position(_fits_big(student_logits), _fits_big(teacher_logits), mask_bt,
                                *cfg)
    return _reduce(loss_bt, mask_bt, reduction)


def tad_components(student_logits, teacher_logits, mask=None, *, top_k=10, beta=2.0,
                   temperature=1.0, eps_alpha=1e-6):
    """The pieces of TAD, for diagnostics and evaluation (no gradient; not scaled by τ²).

    Args:
      student_logits, teacher_logits, mask, top_k, beta, temperature, eps_alpha: as for
        `tad_divergence`.

    Returns:
      dict of float32 arrays: "kl1", "kl2", "alpha_t", "alpha_s", "kl" (= kl1 + alpha_t·kl2), each
      `[..., T]` with 0 at masked positions, and "beta_x" `[...]` (β(X) per row).

    Raises:
      ValueError: as `tad_divergence`.
    """
    mask_bt, top_k, beta, temperature, eps_alpha = _tad_args(
        student_logits, teacher_logits, mask, top_k, beta, temperature, eps_alpha)
    student_logits = jax.lax.stop_gradient(_fits_big(student_logits))
    teacher_logits = jax.lax.stop_gradient(_fits_big(teacher_logits))
    st = _tad_stats(student_logits, teacher_logits, top_k, temperature)
    alpha_t, alpha_s = jnp.exp(st["log_alpha_t"]), jnp.exp(st["log_alpha_s"])
    out = dict(kl1=st["kl1"], kl2=st["kl2"], alpha_t=alpha_t, alpha_s=alpha_s,
               kl=st["kl1"] + alpha_t * st["kl2"])
    out = {k: _masked(v, mask_bt) for k, v in out.items()}
    out["beta_x"] = _beta_x(st["log_alpha_t"], mask_bt, beta, eps_alpha)
    return out


# ----------------------------------------------------------------------------------------------
# Companion divergences
# ----------------------------------------------------------------------------------------------


def _log_softmax(x_btv):
    lse_bt = _lse(x_btv)
    return x_btv - lse_bt[..., None], lse_bt


def _xlogy_diff(p_btv, logp_btv, logq_btv):
    """Σ p·(log p − log q) with 0·(anything) = 0, so -inf padding entries give 0, not NaN."""
    # The where sits inside the product so that autodiff never multiplies 0 by a NaN partial.
    return jnp.sum(p_btv * jnp.where(p_btv > 0, logp_btv - logq_btv, 0.0), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kl_per_position(student_btv, teacher_btv, mask_bt, temperature):
    loss_bt, _ = _kl_fwd(student_btv, teacher_btv, mask_bt, temperature)
    return loss_bt


def _kl_fwd(student_btv, teacher_btv, mask_bt, temperature):
    # TAD's K = 0 statistics are exactly KL's: three select-free reductions over [.., V].
    lse_s = _tail_lse(student_btv, temperature)
    max_t = _scaled(jnp.max(teacher_btv, axis=-1), temperature)
    lse_t, kl_bt = _teacher_tail(student_btv, teacher_btv, temperature, max_t, lse_s)
    loss_bt = _masked(temperature**2 * kl_bt, mask_bt)
    return loss_bt, (student_btv, teacher_btv, mask_bt, lse_s, lse_t)


def _kl_bwd(temperature, res, g_bt):
    # KL's gradient is p_S − p_T (times τ): one fused pass, no autodiff through logsumexp.
    student_btv, teacher_btv, mask_bt, lse_s, lse_t = res
    ps_btv = jnp.exp(_view(student_btv, temperature, floor=2 * _BIG) - lse_s[..., None])
    pt_btv = jnp.exp(_view(teacher_btv, temperature, floor=2 * _BIG) - lse_t[..., None])
    grad_btv = _masked((temperature * g_bt)[..., None] * (ps_btv - pt_btv),
                       mask_bt[..., None]).astype(student_btv.dtype)
    return grad_btv, jnp.zeros_like(teacher_btv), jnp.zeros_like(mask_bt)


_kl_per_position.defvjp(_kl_fwd, _kl_bwd)


def _common_args(student_logits, teacher_logits, mask, temperature, reduction):
    _check_reduction(reduction)
    _check_pair(student_logits, teacher_logits)
    mask_bt = _mask_bt(mask, jnp.shape(student_logits)[:-1])
    return mask_bt, _check_positive("temperature", temperature)


def kl_divergence(student_logits, teacher_logits, mask=None, *, temperature=1.0,
                  reduction="mean"):
    """Forward KL(p_T || p_S) (the paper's vanilla KD), with a closed-form p_S − p_T gradient.

    Args:
      student_logits, teacher_logits: float `[..., T, V]` of equal shape.
      mask: `[..., T]` bool or 0/1; None = all valid.
      temperature: τ > 0; the divergence is multiplied by τ².
      reduction: "none", "sum" or "mean" (module docstring).

    Returns:
      float32 scalar, or `[..., T]` for reduction="none".

    Raises:
      ValueError: on mismatched shapes, integer logits, τ <= 0 or an unknown reduction.
    """
    mask_bt, temperature = _common_args(student_logits, teacher_logits, mask, temperature,
                                        reduction)
    loss_bt = _kl_per_position(_fits_big(student_logits), _fits_big(teacher_logits), mask_bt,
                               temperature)
    return _reduce(loss_bt, mask_bt, reduction)


def _autodiff_log_probs(student_btv, teacher_btv, mask_bt, temperature):
    """log p_S, log p_T (teacher constant) for the losses differentiated by plain autodiff.

    Masked positions are replaced by zeros first: a padded position may hold all -inf logits,
    whose logsumexp has a NaN partial that autodiff would multiply by the zero cotangent.
    """
    keep = mask_bt[..., None] > 0
    s_btv = jnp.where(keep, _scaled(student_btv, temperature), 0.0)
    t_btv = jnp.where(keep, _scaled(jax.lax.stop_gradient(teacher_btv), temperature), 0.0)
    return _log_softmax(s_btv)[0], _log_softmax(t_btv)[0]


def reverse_kl_divergence(student_logits, teacher_logits, mask=None, *, temperature=1.0,
                          reduction="mean"):
    """Reverse KL(p_S || p_T) (mode seeking). Arguments, returns and errors as `kl_divergence`."""
    mask_bt, temperature = _common_args(student_logits, teacher_logits, mask, temperature,
                                        reduction)
    lps_btv, lpt_btv = _autodiff_log_probs(student_logits, teacher_logits, mask_bt, temperature)
    loss_bt = _masked(temperature**2 * _xlogy_diff(jnp.exp(lps_btv), lps_btv, lpt_btv), mask_bt)
    return _reduce(loss_bt, mask_bt, reduction)


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
    w = _static_number("weight", weight)
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
    _check_reduction(reduction)
    _check_float("logits", logits)
    if jnp.shape(logits)[:-1] != jnp.shape(targets) or len(jnp.shape(logits)) < 2:
        raise ValueError(
            f"targets shape {jnp.shape(targets)} must equal logits shape without the vocabulary "
            f"axis ({jnp.shape(logits)[:-1]}); logits must be [..., T, V]."
        )
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise ValueError(f"targets must be integer token ids, got {jnp.result_type(targets)}.")
    mask_bt = _mask_bt(mask, jnp.shape(targets))
    lp_btv, _ = _log_softmax(_scaled(logits, 1.0))
    tgt_lp_bt = jnp.take_along_axis(lp_btv, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
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
    _check_reduction(reduction)
    _check_float("student_hidden", student_hidden)
    _check_float("teacher_hidden", teacher_hidden)
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
                      reduction="mean"):
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

    Returns:
      (total, {"clm": ..., "div": ..., "cosine": ...}); "cosine" is 0 when cosine_weight is 0.

    Raises:
      ValueError: on an unknown divergence, a negative cosine_weight, missing hidden states, or any
        error of the parts.
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {_DIVERGENCES}, got {divergence!r}.")
    cosine_weight = _static_number("cosine_weight", cosine_weight)
    if cosine_weight < 0:
        raise ValueError(f"cosine_weight must be >= 0, got {cosine_weight}.")
    clm = causal_lm_loss(student_logits, targets, mask, reduction)
    common = dict(temperature=temperature, reduction=reduction)
    if divergence == "tad":
        div = tad_divergence(student_logits, teacher_logits, mask, top_k=top_k, beta=beta,
                             eps_alpha=eps_alpha, **common)
    elif divergence == "kl":
        div = kl_divergence(student_logits, teacher_logits, mask, **common)
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
