"""Review 4: the public losses, fused losses and metrics against a float64 numpy reference.

The reference below is written from TAD_SPEC.md alone (log space, float64, the head from numpy's
stable argsort of -b: equal values keep the lowest index first), not from the library's math.
Padding convention of the spec/module docs: a student -inf entry leaves both distributions; a
position with no teacher entry left gives 0 and α_T = 0 (K >= 1).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tad_jax
from tad_jax import metrics

# ------------------------------------------------------------------------------ reference


def _lse(x):
    x = np.asarray(x, np.float64)
    if x.size == 0 or np.all(np.isneginf(x)):
        return -np.inf
    m = np.max(x)
    return float(np.log(np.sum(np.exp(x - m))) + m)


def ref_position(s, t, k, tau=1.0):
    """TAD pieces of one position (s, t: [V]) and d/da of KL and of α_T·D_KL2, float64."""
    a = np.asarray(s, np.float64) / tau
    b = np.asarray(t, np.float64) / tau
    drop = np.isneginf(a)
    b = np.where(drop, -np.inf, b)
    v = a.shape[0]
    zero = np.zeros(v)
    if np.all(np.isneginf(b)):
        return dict(kl1=0.0, kl2=0.0, alpha_t=0.0 if k else 1.0, kl=0.0, g_kl=zero, g_tail=zero)
    lps = np.where(drop, -np.inf, a - _lse(a[~drop]))
    lpt = b - _lse(b)
    ps, pt = np.exp(lps), np.exp(lpt)
    head = np.zeros(v, bool)
    head[np.argsort(-b, kind="stable")[:k]] = True
    tail = ~head
    lat = _lse(lpt[tail])
    las = _lse(lps[tail])
    alpha_t = np.exp(lat)

    def xlogratio(p, lp, lq):  # p·(log p − log q), 0 where p = 0
        with np.errstate(invalid="ignore"):
            return np.where(p > 0, p * (lp - lq), 0.0)

    kl_v = xlogratio(pt, lpt, lps)
    kl1 = float(np.sum(np.where(head, kl_v, 0.0)))
    kl2 = 0.0
    g_tail = zero
    if alpha_t > 0:
        kl1 += alpha_t * (lat - las)
        lpt_t, lps_t = lpt - lat, lps - las
        kl2 = float(np.sum(np.where(tail, xlogratio(np.exp(lpt_t), lpt_t, lps_t), 0.0)))
        # d(α_T·D_KL2)/da_i = α_T·p̃_S,i − p_T,i on the tail (α_T is a teacher constant)
        g_tail = np.where(tail & ~drop, np.exp(lps - las + lat) - pt, 0.0)
    return dict(kl1=kl1, kl2=kl2, alpha_t=alpha_t, kl=float(np.sum(kl_v)),
                g_kl=np.where(drop, 0.0, ps - pt), g_tail=g_tail)


def ref_tad(s, t, mask=None, *, k=10, beta=2.0, tau=1.0, eps=1e-6, reduction="mean",
            segment_ids=None):
    """(loss, d loss / d s) of TAD_SPEC.md over [..., T, V] logits, float64."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    lead, v = s.shape[:-1], s.shape[-1]
    m = np.ones(lead) if mask is None else (np.asarray(mask) != 0).astype(np.float64)
    rows = [ref_position(si, ti, k, tau) for si, ti in zip(s.reshape(-1, v), t.reshape(-1, v),
                                                             strict=True)]
    at = np.array([r["alpha_t"] for r in rows]).reshape(lead) * m
    tlen = lead[-1]
    if segment_ids is None:
        mean = at.sum(-1, keepdims=True) / np.maximum(m.sum(-1, keepdims=True), 1)
        mean = np.broadcast_to(mean, lead)
    else:
        seg = np.asarray(segment_ids).reshape(-1, tlen)
        a2, m2 = at.reshape(-1, tlen), m.reshape(-1, tlen)
        mean = np.zeros_like(a2)
        for r in range(seg.shape[0]):
            for j in range(tlen):
                same = seg[r] == seg[r, j]
                mean[r, j] = a2[r][same].sum() / max(m2[r][same].sum(), 1)
        mean = mean.reshape(lead)
    bx = (beta / np.maximum(mean, eps)).reshape(-1)
    loss = np.array([tau**2 * (r["kl1"] + bx[i] * r["alpha_t"] * r["kl2"])
                     for i, r in enumerate(rows)]).reshape(lead) * m
    grad = np.stack([tau * (r["g_kl"] + (bx[i] - 1) * r["g_tail"])
                     for i, r in enumerate(rows)]).reshape(s.shape) * m[..., None]
    if reduction == "none":
        return loss, grad  # (grad of the sum)
    if reduction == "sum":
        return loss.sum(), grad
    n = max(m.sum(), 1.0)
    return loss.sum() / n, grad / n


def _lib_tad(s, t, mask=None, **kw):
    def f(s):
        return tad_jax.tad_divergence(s, t, mask, **kw)

    return f(s), jax.grad(lambda s: jnp.sum(f(s)))(s)


def _close(got, want, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


def _logits(shape, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _fused_args(lead=(2, 5), d=6, v=24, seed=0):
    rng = np.random.default_rng(seed)
    hs = rng.standard_normal(lead + (d,)).astype(np.float32)
    ht = rng.standard_normal(lead + (d + 2,)).astype(np.float32)
    ws = rng.standard_normal((d, v)).astype(np.float32)
    wt = 2 * rng.standard_normal((d + 2, v)).astype(np.float32)
    return hs, ws, ht, wt


# ------------------------------------------------------------------------------ the reference


def test_reference_gradient_matches_finite_differences():
    # The float64 reference's closed-form gradient (β(X) held constant) against central finite
    # differences of its own loss: guards the reference every other test here relies on.
    s = _logits((1, 2, 7), 1).astype(np.float64)
    t = _logits((1, 2, 7), 2).astype(np.float64)
    s[0, 0, 4] = -np.inf
    t[0, 1, 2] = -np.inf
    _, g = ref_tad(s, t, k=2, tau=1.7, reduction="sum")
    at = np.array([ref_position(s[0, j], t[0, j], 2, 1.7)["alpha_t"] for j in range(2)])
    bx = 2.0 / max(at.mean(), 1e-6)

    def loss(sv):
        out = 0.0
        for j in range(2):
            p = ref_position(sv[0, j], t[0, j], 2, 1.7)
            out += 1.7**2 * (p["kl1"] + bx * p["alpha_t"] * p["kl2"])
        return out

    fd = np.zeros_like(s)
    for idx in np.ndindex(s.shape):
        if np.isfinite(s[idx]):
            hi, lo = s.copy(), s.copy()
            hi[idx] += 1e-6
            lo[idx] -= 1e-6
            fd[idx] = (loss(hi) - loss(lo)) / 2e-6
    np.testing.assert_allclose(fd, g, atol=1e-7)


# ------------------------------------------------------------------------------ β(X) per segment


@pytest.mark.parametrize("ids", [[[100, 100, 200, 200, 7], [0, 7, 7, 9, 9]],
                                 [[-1, -1, -2, -2, 5], [0, 3, 3, -4, -4]]],
                         ids=["ids_above_T", "negative_ids"])
def test_segment_ids_outside_0_T_keep_documents_apart(ids):
    # segment_ids name documents; any integers do. Ids outside [0, T] used to be clipped into
    # [0, T], merging documents 100 and 200 (or -1 and -2) into one sequence X: β(X) wrong.
    s, t = _logits((2, 5, 12), 1), _logits((2, 5, 12), 2)
    seg = np.asarray(ids)
    mask = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    want, gwant = ref_tad(s, t, mask, k=3, segment_ids=seg)
    got, g = _lib_tad(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), top_k=3,
                      beta_scope="segment", segment_ids=jnp.asarray(seg))
    _close(got, want)
    _close(g, gwant)
    # the same documents renumbered 1..n give the same loss
    dense = np.array([[1, 1, 2, 2, 3], [0, 1, 1, 2, 2]])
    _close(got, ref_tad(s, t, mask, k=3, segment_ids=dense)[0])


@pytest.mark.parametrize("chunk_size", [3, 64])  # rows spanning chunks (pre-pass), whole rows
def test_fused_segment_ids_outside_0_T(chunk_size):
    hs, ws, ht, wt = _fused_args()
    seg = np.array([[100, 100, 200, 200, 200], [0, 50, 50, 60, 60]])
    mask = np.array([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    zs, zt = hs.astype(np.float64) @ ws, ht.astype(np.float64) @ wt
    want = ref_tad(zs, zt, mask, k=3, segment_ids=seg)[0]
    got = tad_jax.fused_tad_loss(jnp.asarray(hs), jnp.asarray(ws), jnp.asarray(ht),
                                 jnp.asarray(wt), jnp.asarray(mask), top_k=3,
                                 beta_scope="segment", segment_ids=jnp.asarray(seg),
                                 chunk_size=chunk_size)
    _close(got, want)


def test_float_segment_ids_are_refused():
    s, t = jnp.asarray(_logits((2, 5, 12), 1)), jnp.asarray(_logits((2, 5, 12), 2))
    seg = jnp.asarray([[1.0, 1.5, 2.0, 2.0, 2.0]] * 2)  # 1.5 would be truncated to 1
    with pytest.raises(ValueError, match="segment_ids must be integer"):
        tad_jax.tad_divergence(s, t, top_k=3, beta_scope="segment", segment_ids=seg)
    hs, ws, ht, wt = (jnp.asarray(x) for x in _fused_args())
    with pytest.raises(ValueError, match="segment_ids must be integer"):
        tad_jax.fused_tad_loss(hs, ws, ht, wt, top_k=3, beta_scope="segment", segment_ids=seg)


# ------------------------------------------------------------------------------ bad settings


@pytest.mark.parametrize("name", ["beta", "temperature", "eps_alpha"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_settings_are_refused(name, value):
    # β = ∞ or τ = ∞ used to pass the "> 0" check and give a NaN loss (eps_alpha = ∞: a 0 one).
    s, t = jnp.asarray(_logits((1, 3, 12), 1)), jnp.asarray(_logits((1, 3, 12), 2))
    with pytest.raises(ValueError, match=name):
        tad_jax.tad_divergence(s, t, top_k=3, **{name: value})


@pytest.mark.parametrize("fn", ["reverse_kl_divergence", "js_divergence", "kl_divergence"])
def test_infinite_temperature_is_refused_by_the_companions(fn):
    s, t = jnp.asarray(_logits((1, 3, 12), 1)), jnp.asarray(_logits((1, 3, 12), 2))
    with pytest.raises(ValueError, match="temperature"):
        getattr(tad_jax, fn)(s, t, temperature=float("inf"))


def test_infinite_softcap_is_refused():
    hs, ws, ht, wt = (jnp.asarray(x) for x in _fused_args())
    with pytest.raises(ValueError, match="final_logit_softcap"):
        tad_jax.fused_tad_loss(hs, ws, ht, wt, top_k=3, final_logit_softcap=float("inf"))


# ------------------------------------------------------------------------------ fused: bad calls


def test_fused_divergence_without_teacher_names_the_fix():
    # Used to raise KeyError: 'ht' from inside the scan.
    hs, ws, _, wt = (jnp.asarray(x) for x in _fused_args())
    y = jnp.zeros(hs.shape[:-1], jnp.int32)
    for teacher_head in (None, wt):
        with pytest.raises(ValueError, match="teacher_hidden"):
            tad_jax.fused_distillation_loss(hs, ws, None, teacher_head, y, top_k=3)


def test_fused_loss_with_nothing_to_compute_is_refused():
    # fused_causal_lm_loss(h, W, None) used to return 0: no term at all, silently.
    hs, ws, ht, wt = (jnp.asarray(x) for x in _fused_args())
    with pytest.raises(ValueError, match="targets"):
        tad_jax.fused_causal_lm_loss(hs, ws, None)
    with pytest.raises(ValueError, match="targets"):
        tad_jax.fused_distillation_loss(hs, ws, ht, wt, None, divergence=None)


# ------------------------------------------------------------------------------ metrics: bad calls


def test_metrics_refuse_float_targets_and_integer_logits():
    s, t = jnp.asarray(_logits((2, 3, 12), 1)), jnp.asarray(_logits((2, 3, 12), 2))
    y, m = jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="targets must be integer"):
        metrics.eval_sums(s, t, y + 0.7, m)  # used to be truncated to token 0 silently
    with pytest.raises(ValueError, match="floating point"):
        metrics.eval_sums(s.astype(jnp.int32), t, y, m)


def test_metrics_mask_none_counts_every_position():
    # mask=None was refused ("mask () must be ..."): it now means every position counts.
    s, t = jnp.asarray(_logits((2, 3, 12), 1)), jnp.asarray(_logits((2, 3, 12), 2))
    y = jnp.asarray(np.random.default_rng(3).integers(0, 12, (2, 3)), jnp.int32)
    got, want = metrics.eval_sums(s, t, y, None), metrics.eval_sums(s, t, y, jnp.ones((2, 3)))
    assert float(got["count"]) == 6.0
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_numpy_top_k_is_taken_and_jax_or_bool_refused():
    # top_k=np.int64(2) (e.g. read from a config array) was refused as "not a Python int".
    s, t = jnp.asarray(_logits((2, 3, 12), 1)), jnp.asarray(_logits((2, 3, 12), 2))
    want = tad_jax.tad_divergence(s, t, top_k=2)
    np.testing.assert_array_equal(tad_jax.tad_divergence(s, t, top_k=np.int64(2)), want)
    assert type(tad_jax.TADConfig(top_k=np.int32(3)).top_k) is int
    for bad in (jnp.int32(2), True, 2.0):
        with pytest.raises(ValueError, match="top_k must be a static integer"):
            tad_jax.TADConfig(top_k=bad)


def test_fused_loss_refuses_integer_hidden_states_and_heads():
    # Integer hidden states (token ids by mistake) or heads were taken silently.
    hs, ws, ht, wt = (jnp.asarray(x) for x in _fused_args())
    for args, name in (((hs.astype(jnp.int32), ws, ht, wt), "student_hidden"),
                       ((hs, ws, ht, wt.astype(jnp.int32)), "teacher_head")):
        with pytest.raises(ValueError, match=f"{name} must be floating point"):
            tad_jax.fused_tad_loss(*args, top_k=3)


def test_fused_loss_takes_list_and_numpy_masks():
    # A mask given as a list (accepted by the unfused losses) was an AttributeError.
    hs, ws, ht, wt = (jnp.asarray(x) for x in _fused_args())
    m = [[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]]
    want = tad_jax.fused_tad_loss(hs, ws, ht, wt, jnp.asarray(m), top_k=3)
    for mask in (m, np.asarray(m)):
        np.testing.assert_array_equal(tad_jax.fused_tad_loss(hs, ws, ht, wt, mask, top_k=3), want)


# ------------------------------------------------------------------------------ coverage vs the
# reference: adversarial inputs that turned out right (kept as regression tests)


def _case(name, v):
    """(s, t) float32 [2, 3, V] logits of one adversarial case."""
    s, t = _logits((2, 3, v), 1), _logits((2, 3, v), 2)
    if name == "ties":  # many equal teacher values, so the K-th place is a tie
        t = np.round(t / 4).astype(np.float32)
    elif name == "flat_teacher":
        t = np.zeros_like(t)
    elif name == "student_pad":  # the student's padded columns, one at the teacher's argmax
        s[..., -3:] = -np.inf
        np.put_along_axis(s, np.argmax(t, -1)[..., None], -np.inf, -1)
    elif name == "teacher_pad":
        t[..., -3:] = -np.inf
    elif name == "both_pad_and_empty":
        s[..., -3:] = -np.inf
        t[..., -5:] = -np.inf
        s[0, 1] = -np.inf  # no student entry at all
        t[1, 2] = -np.inf  # no teacher entry at all
    elif name == "magnitude_1e4":
        s, t = 3e3 * s, 3e3 * t + 1e4
    elif name == "tails_1000_below":
        s[..., 7:] -= 1000.0
        t[..., 5:] -= 1000.0
    return s, t


_CASES = ["plain", "ties", "flat_teacher", "student_pad", "teacher_pad", "both_pad_and_empty",
          "magnitude_1e4", "tails_1000_below"]


@pytest.mark.parametrize("v,k", [(12, 0), (12, 3), (12, 11), (300, 1), (520, 3)])
@pytest.mark.parametrize("name", _CASES)
def test_tad_divergence_adversarial(name, v, k):
    s, t = _case(name, v)
    want, gwant = ref_tad(s, t, k=k, reduction="sum")
    got, g = _lib_tad(jnp.asarray(s), jnp.asarray(t), top_k=k, reduction="sum")
    _close(got, want, rtol=1e-5, atol=2e-4 if name == "magnitude_1e4" else 1e-5)
    _close(g, gwant)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_tad_divergence_low_precision_settings(dtype):
    # bf16/f16 logits (the reference sees the rounded values), τ ≠ 1, a masked row, segments,
    # extra leading dims; gradients come back in the input dtype.
    s = jnp.asarray(_logits((2, 2, 3, 64), 4), dtype)
    t = jnp.asarray(_logits((2, 2, 3, 64), 5), dtype)
    mask = np.array([[[1, 1, 0], [0, 0, 0]], [[1, 1, 1], [0, 1, 1]]])
    seg = np.array([[[1, 1, 2], [1, 1, 1]], [[5, 9, 9], [0, 3, 3]]])
    want, gwant = ref_tad(np.asarray(s, np.float32), np.asarray(t, np.float32), mask, k=5,
                          tau=2.5, segment_ids=seg)
    got, g = _lib_tad(s, t, jnp.asarray(mask), top_k=5, temperature=2.5, beta_scope="segment",
                      segment_ids=jnp.asarray(seg))
    assert got.dtype == jnp.float32 and g.dtype == dtype
    _close(got, want, rtol=1e-5)
    _close(np.asarray(g, np.float32), gwant, rtol=1e-2, atol=1e-5)  # (g rounded to dtype)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_companion_losses_against_reference(reduction):
    # The student's padding (3 columns, and all of position [0, 1]: 0 loss); the teacher -inf
    # only on those columns (elsewhere RKL would be +inf).
    s, t = _case("both_pad_and_empty", 12)
    t = _logits((2, 3, 12), 2)
    t[..., -3:] = -np.inf
    mask = np.array([[1, 0, 1], [1, 1, 1]])
    tau, w = 1.5, 0.3
    a, b = s / tau, np.where(np.isneginf(s), -np.inf, t) / tau
    rkl, jsd = np.zeros((2, 3)), np.zeros((2, 3))
    for i, j in np.ndindex(2, 3):
        keep = ~np.isneginf(a[i, j])
        if not keep.any() or not mask[i, j]:
            continue
        lps = a[i, j, keep] - _lse(a[i, j, keep])
        lpt = b[i, j, keep] - _lse(b[i, j, keep])
        ps, pt = np.exp(lps), np.exp(lpt)
        lm = np.log(w * pt + (1 - w) * ps)
        rkl[i, j] = tau**2 * np.sum(ps * (lps - lpt))
        jsd[i, j] = tau**2 * (w * np.sum(np.where(pt > 0, pt * (lpt - lm), 0.0))
                              + (1 - w) * np.sum(ps * (lps - lm)))
    n = mask.sum()
    red = {"none": lambda x: x, "sum": np.sum, "mean": lambda x: np.sum(x) / n}[reduction]
    sj, tj, mj = jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask)
    _close(tad_jax.reverse_kl_divergence(sj, tj, mj, temperature=tau, reduction=reduction),
           red(rkl))
    _close(tad_jax.js_divergence(sj, tj, mj, weight=w, temperature=tau, reduction=reduction),
           red(jsd))
    kl, gkl = ref_tad(s, t, mask, k=0, beta=1.0, tau=tau, reduction=reduction)
    _close(tad_jax.kl_divergence(sj, tj, mj, temperature=tau, reduction=reduction), kl)
    g = jax.grad(lambda s: jnp.sum(tad_jax.kl_divergence(s, tj, mj, temperature=tau,
                                                         reduction=reduction)))(sj)
    _close(g, gkl)


def _ref_fused(hs, ws, bs, ht, wt, bt, y, mask, cap, k, tau, reduction, seg):
    """(loss, dh, dW, db) of CLM + TAD on softcap(h W + b), float64."""
    f64 = [None if x is None else np.asarray(x, np.float64) for x in (hs, ws, bs, ht, wt, bt)]
    hs, ws, bs, ht, wt, bt = f64
    zs = hs @ ws + (0.0 if bs is None else bs)
    zt = ht @ wt + (0.0 if bt is None else bt)
    dcap = 1.0
    if cap is not None:
        dcap = 1.0 - np.tanh(zs / cap) ** 2
        zs, zt = cap * np.tanh(zs / cap), cap * np.tanh(zt / cap)
    m = np.ones(zs.shape[:-1]) if mask is None else (np.asarray(mask) != 0) * 1.0
    loss, dz = ref_tad(zs, zt, mask, k=k, tau=tau, reduction=reduction, segment_ids=seg)
    lps = zs - np.log(np.sum(np.exp(zs - zs.max(-1, keepdims=True)), -1, keepdims=True)) \
        - zs.max(-1, keepdims=True)
    clm = -np.take_along_axis(lps, y[..., None], -1)[..., 0] * m
    dclm = (np.exp(lps) - np.eye(zs.shape[-1])[y]) * m[..., None]
    n = max(m.sum(), 1.0) if reduction == "mean" else 1.0
    loss = loss + (clm if reduction == "none" else clm.sum() / n)
    dz = (dz + dclm / n) * dcap
    flat = dz.reshape(-1, dz.shape[-1])
    return loss, dz @ ws.T, hs.reshape(-1, hs.shape[-1]).T @ flat, flat.sum(0)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 10, 64])  # < T, rows spanning, = T, > T
@pytest.mark.parametrize("variant", ["plain", "padded_biases_softcap_tau", "segments_none",
                                     "frozen_head_3d"])
def test_fused_distillation_loss_against_reference(chunk_size, variant):
    hs, ws, ht, wt = _fused_args(lead=(2, 2, 5) if variant == "frozen_head_3d" else (2, 5), v=50)
    lead, v = hs.shape[:-1], ws.shape[1]
    rng = np.random.default_rng(1)
    y = rng.integers(0, v - 4, lead)
    bs = bt = mask = seg = cap = None
    tau, k, reduction, head_grad = 1.0, 3, "mean", True
    if variant == "padded_biases_softcap_tau":
        bs = rng.standard_normal(v).astype(np.float32)
        bs[-4:] = -np.inf  # padded student columns (no soft-cap: those would not stay -inf)
        bt = rng.standard_normal(v).astype(np.float32)
        bt[::7] = -np.inf  # the teacher's zero probabilities
        tau, k = 1.7, 10
    if variant == "segments_none":
        mask = np.array([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
        seg = np.array([[1, 1, 2, 2, 0], [0, 1, 1, 2, 3]])
        cap, reduction = 4.0, "none"
    if variant == "frozen_head_3d":
        head_grad, k = False, 49
    want, dh, dw, db = _ref_fused(hs, ws, bs, ht, wt, bt, y, mask, cap, k, tau, reduction, seg)
    kw = dict(top_k=k, temperature=tau, chunk_size=chunk_size, final_logit_softcap=cap,
              reduction=reduction, student_head_grad=head_grad, teacher_bias=bt)
    if seg is not None:
        kw.update(beta_scope="segment", segment_ids=jnp.asarray(seg))

    def f(hs, ws, bs):
        return jnp.sum(tad_jax.fused_distillation_loss(
            hs, ws, jnp.asarray(ht), jnp.asarray(wt), jnp.asarray(y),
            None if mask is None else jnp.asarray(mask), student_bias=bs, **kw)[0])

    args = (jnp.asarray(hs), jnp.asarray(ws), None if bs is None else jnp.asarray(bs))
    got = tad_jax.fused_distillation_loss(args[0], args[1], jnp.asarray(ht), jnp.asarray(wt),
                                          jnp.asarray(y), None if mask is None else
                                          jnp.asarray(mask), student_bias=args[2], **kw)[0]
    _close(got, want, rtol=2e-5, atol=2e-5)
    g = jax.grad(f, argnums=(0, 1, 2) if bs is not None else (0, 1))(*args)
    _close(g[0], dh, rtol=1e-4, atol=1e-5)
    if head_grad:
        _close(g[1], dw, rtol=1e-4, atol=1e-5)
    else:
        assert not np.any(np.asarray(g[1]))
    if bs is not None:
        _close(g[2], db, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ metrics


def _ref_metrics(s, t, y, mask, ks, bins):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    t = np.where(np.isneginf(s), -np.inf, t)
    v = s.shape[-1]
    keep = np.asarray(mask).reshape(-1) != 0
    s, t, y = s.reshape(-1, v)[keep], t.reshape(-1, v)[keep], np.asarray(y).reshape(-1)[keep]
    lps = np.stack([x - _lse(x) for x in s])
    lpt = np.stack([x - _lse(x) for x in t])
    ps, n = np.exp(lps), len(y)
    tail = {}
    for k in ks:
        tail[k] = np.mean([np.exp(_lse(x[np.argsort(-x, kind="stable")[k:]])) for x in lpt])
    b = np.clip(np.floor(ps * bins).astype(int), 0, bins - 1)
    hits, conf = np.zeros(bins), np.zeros(bins)
    np.add.at(conf, b, ps)
    np.add.at(hits, b[np.arange(n), y], 1.0)
    return dict(kl=np.mean([ref_position(a, c, 0)["kl"] for a, c in zip(s, t, strict=True)]),
                full_ece=np.sum(np.abs(hits - conf)) / n,
                mismatch_rate=np.mean(np.argmax(lpt, -1) != y),
                top1_agreement=np.mean(np.argmax(lps, -1) == np.argmax(lpt, -1)),
                student_ce=-np.mean(lps[np.arange(n), y]),
                teacher_ce=-np.mean(lpt[np.arange(n), y]),
                tail_mass=tail, tokens=n)


@pytest.mark.parametrize("name", ["plain", "ties", "flat_teacher", "student_pad", "teacher_pad",
                                  "magnitude_1e4", "tails_1000_below"])
def test_metrics_against_reference(name):
    v, ks, bins = 64, (1, 2, 5, 63, 64, 80), 7
    s, t = _case(name, v)
    if name == "student_pad":
        s[..., -3:] = -np.inf  # (not at the teacher's argmax: the targets must stay finite)
        s[..., :-3] = _logits((2, 3, v - 3), 1)
    s, t = 4.0 * s if name == "plain" else s, t  # sharp: probabilities in the upper bins
    y = np.random.default_rng(2).integers(0, v - 3, (2, 3))
    y[0, 0] = int(np.argmax(t[0, 0]))
    mask = np.array([[1, 1, 1], [0, 1, 1]])
    got = metrics.finalize(metrics.add_sums(None, metrics.eval_sums(
        jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask), tail_ks=ks,
        ece_bins=bins)))
    want = _ref_metrics(s, t, y, mask, ks, bins)
    for key, w in want.items():
        if key == "tail_mass":
            assert list(got[key]) == sorted(ks)
            _close([got[key][k] for k in ks], [w[k] for k in ks], rtol=1e-4)
        else:
            _close(got[key], w, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_fused_clm_out_of_range_target_gradient_matches_its_value(chunk_size):
    # An unmasked target outside [0, V) (an HF-style -100 left unmasked) adds 0 to the CLM in
    # both the fused and the unfused loss (`tad_core.at_targets`); the fused gradient was
    # p_S there (softmax − a one-hot of nothing), not the 0 of that value and of causal_lm_loss.
    hs, ws, _, _ = (jnp.asarray(x) for x in _fused_args())
    y = np.random.default_rng(0).integers(0, ws.shape[1], hs.shape[:-1])
    y[0, 0], y[1, 3] = -100, ws.shape[1]
    y = jnp.asarray(y, jnp.int32)

    def fused(h):
        return tad_jax.fused_causal_lm_loss(h, ws, y, reduction="sum", chunk_size=chunk_size)

    zs = np.asarray(hs, np.float64) @ np.asarray(ws, np.float64)
    lp = zs - np.log(np.sum(np.exp(zs), -1, keepdims=True))
    valid = (np.asarray(y) >= 0) & (np.asarray(y) < ws.shape[1])
    yc = np.where(valid, np.asarray(y), 0)
    want = -np.sum(np.where(valid, np.take_along_axis(lp, yc[..., None], -1)[..., 0], 0.0))
    dz = np.where(valid[..., None], np.exp(lp) - np.eye(ws.shape[1])[yc], 0.0)
    _close(fused(hs), want)
    _close(tad_jax.causal_lm_loss(hs @ ws, y, reduction="sum"), want)
    _close(jax.grad(fused)(hs), dz @ np.asarray(ws, np.float64).T, rtol=1e-4, atol=1e-5)


def test_full_ece_counts_no_hit_for_a_target_outside_the_vocabulary():
    # Full-ECE's hits_m counts the (i, k) in bin m with k = y_i: none when y_i is outside
    # [0, V) (e.g. an unmasked -100). The target's probability read as exp(0) = 1 put a hit in
    # the top bin.
    s, t = _logits((2, 3, 12), 1), _logits((2, 3, 12), 2)
    y = np.random.default_rng(0).integers(0, 12, (2, 3))
    y[0, 1], y[1, 2] = -100, 12
    mask = np.ones((2, 3))
    sums = metrics.eval_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), jnp.asarray(mask),
                             ece_bins=5)
    ps = np.exp(np.stack([x - _lse(x) for x in s.reshape(-1, 12).astype(np.float64)]))
    b = np.clip(np.floor(ps * 5).astype(int), 0, 4)
    hits, conf = np.zeros(5), np.zeros(5)
    np.add.at(conf, b, ps)
    yv = y.reshape(-1)
    ok = (yv >= 0) & (yv < 12)
    np.add.at(hits, b[np.arange(6)[ok], yv[ok]], 1.0)
    _close(sums["ece_hits_m"], hits)
    _close(sums["ece_conf_m"], conf, rtol=1e-5)


@pytest.mark.parametrize("shard_ids", [True, False])
def test_segment_scope_on_rows_sharded_over_explicit_axes(shard_ids):
    # β(X) per segment on rows sharded over an Explicit mesh axis, mask None: main raised
    # "Mapped away dimension of inputs passed to vmap should be sharded the same" (the mask of
    # ones, unsharded, against sharded α); a vmapped searchsorted also failed there.
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    s, t = _logits((8, 4, 40), 1), _logits((8, 4, 40), 2)
    seg = np.random.default_rng(0).integers(0, 3, (8, 4)) * 50
    want, gwant = ref_tad(s, t, k=3, segment_ids=seg)
    f = jax.jit(jax.value_and_grad(lambda s, t, seg: tad_jax.tad_divergence(
        s, t, top_k=3, beta_scope="segment", segment_ids=seg)))
    sh, rows = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", None))
    got, g = f(jax.device_put(jnp.asarray(s), sh), jax.device_put(jnp.asarray(t), sh),
               jax.device_put(jnp.asarray(seg, jnp.int32), rows) if shard_ids
               else jnp.asarray(seg, jnp.int32))
    _close(got, want)
    _close(g, gwant)


def test_segment_scope_with_positions_sharded_over_explicit_axes():
    # beta_x's sorts and vmapped segment sums along a T sharded over an Explicit axis were a
    # ShardingTypeError: T is now gathered there, and β(X) resharded as α.
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
    s, t = _logits((2, 4, 40), 1), _logits((2, 4, 40), 2)
    seg = np.array([[1, 1, 2, 2], [5, 5, 5, 9]])
    want = ref_tad(s, t, k=3, segment_ids=seg)[0]
    sh, pos = NamedSharding(mesh, P("data", "seq")), NamedSharding(mesh, P("data", "seq"))
    got = jax.jit(lambda s, t, seg: tad_jax.tad_divergence(
        s, t, top_k=3, beta_scope="segment", segment_ids=seg))(
        jax.device_put(jnp.asarray(s), sh), jax.device_put(jnp.asarray(t), sh),
        jax.device_put(jnp.asarray(seg, jnp.int32), pos))
    _close(got, want)


def test_fused_loss_of_an_empty_sequence():
    # T = 0 (and no rows) gave a ZeroDivisionError in the chunk layout: now 0 and a 0 gradient, as
    # tad_divergence gives.
    hs, ws, ht, wt = (jnp.asarray(x) for x in _fused_args())
    for cut in (np.s_[:, :0], np.s_[:0]):
        h_s, h_t = hs[cut], ht[cut]
        got = tad_jax.fused_tad_loss(h_s, ws, h_t, wt, top_k=3)
        assert float(got) == 0.0 == float(tad_jax.tad_divergence(h_s @ ws, h_t @ wt, top_k=3))
        g = jax.grad(functools.partial(tad_jax.fused_tad_loss, h_s, top_k=3), argnums=0)(
            ws, h_t, wt)
        assert g.shape == ws.shape and not np.any(np.asarray(g))
        none = tad_jax.fused_tad_loss(h_s, ws, h_t, wt, top_k=3, reduction="none")
        assert none.shape == h_s.shape[:-1]
