"""Review tests of the two-level head (`tad_core._blocked_terms`) against a float64 numpy reference.

The reference is written here from TAD_SPEC.md in probability space (numpy, float64): the head is
numpy's stable argsort of -b (IEEE equal values keep the lowest index first), α from the tail's
logsumexp, the KL identity checked against the full KL. Head-independent quantities (lse of a and
b, KL = D_KL1 + α_T·D_KL2) must hold whatever the head.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tad_jax import tad_core as core
from tad_jax import tad_divergence

V = 1000  # >= 4·k·32 for k <= 7: the two-level search (not lax.top_k) off TPU


def _got(terms, name):
    """A TokenTerms field, or a logsumexp from its (row maximum, log Σ e^(x − m)) parts."""
    if name in ("lse_s", "lse_t"):
        side = name[-1]
        return getattr(terms, "m_" + side) + getattr(terms, "log_z" + side)
    return getattr(terms, name)


def _lse(x, where=None):
    x = np.where(where, x, -np.inf) if where is not None else x
    m = np.max(x, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(np.exp(x - m), -1)) + m[..., 0]


def ref_terms(s, t, k):
    """float64 TAD pieces at τ = 1 (finite student logits)."""
    a, b = np.asarray(s, np.float64), np.asarray(t, np.float64)
    order = np.argsort(-b, axis=-1, kind="stable")[..., :k]
    head = np.zeros(b.shape, bool)
    np.put_along_axis(head, order, True, -1)
    lse_s, lse_t = _lse(a), _lse(b)
    lps, lpt = a - lse_s[..., None], b - lse_t[..., None]
    pt = np.exp(lpt)
    lat, las = _lse(b, ~head) - lse_t, _lse(a, ~head) - lse_s
    at = np.exp(lat)
    x = pt * (lpt - lps)
    kl1 = np.sum(np.where(head, x, 0.0), -1) + at * (lat - las)
    lpt_t, lps_t = b - _lse(b, ~head)[..., None], a - _lse(a, ~head)[..., None]
    kl2 = np.sum(np.where(head, 0.0, np.exp(lpt_t) * (lpt_t - lps_t)), -1)
    return dict(order=order, head=head, lse_s=lse_s, lse_t=lse_t, kl=np.sum(x, -1), kl1=kl1,
                kl2=kl2, log_alpha_t=lat, log_alpha_s=las, ps=np.exp(lps), pt=pt)


def ref_loss_grad(s, t, k, beta=2.0):
    """Mean TAD (all positions valid, β(X) per row) and its Eq. 6 gradient, float64."""
    r = ref_terms(s, t, k)
    at = np.exp(r["log_alpha_t"])
    bx = beta / np.maximum(np.mean(at, -1, keepdims=True), 1e-6)
    n = at.size
    loss = np.sum(r["kl1"] + bx * at * r["kl2"]) / n
    ratio = np.exp(r["log_alpha_t"] - r["log_alpha_s"])[..., None]
    g = r["ps"] - r["pt"] + np.where(r["head"], 0.0, (bx - 1)[..., None]
                                     * (r["ps"] * ratio - r["pt"]))
    return loss, g / n


def _teacher_with_zeros(zeros, seed=0):
    """Teacher logits < -1 except `zeros` at columns 10, 300, 301, 700 (blocks 0, 2, 2, 5 of 128):
    the K-th place falls among them for K <= 4."""
    rng = np.random.default_rng(seed)
    t = -1.0 - np.abs(rng.standard_normal((2, 3, V))).astype(np.float32)
    t[..., [10, 300, 301, 700]] = np.asarray(zeros, np.float32)
    s = (2.0 * rng.standard_normal((2, 3, V))).astype(np.float32)
    return s, t


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("zeros", [[-0.0, 0.0, -0.0, 0.0], [0.0, -0.0, 0.0, -0.0]])
def test_signed_zero_ties_at_the_kth_place(k, zeros):
    # -0.0 == 0.0 (in_tail's comparison), but lax.top_k orders 0.0 above -0.0: the head must be
    # the lowest-index K of equal values, and the sums over "tail + head's K values" must still
    # cover every entry exactly once (lse of b, KL = D_KL1 + α_T·D_KL2).
    assert core._head_block(V, k) is not None
    s, t = _teacher_with_zeros(zeros)
    r = ref_terms(s, t, k)
    head, terms = core.pair_terms(jnp.asarray(s), jnp.asarray(t), k, 1.0)
    np.testing.assert_array_equal(np.sort(np.asarray(head.idx_k), -1), np.sort(r["order"], -1))
    members = ~np.asarray(core.in_tail(jnp.asarray(t), head))
    np.testing.assert_array_equal(members.sum(-1), k)  # the Head's rule names K entries
    for name in ("lse_t", "lse_s", "kl1", "kl2", "log_alpha_t", "log_alpha_s"):
        np.testing.assert_allclose(_got(terms, name), r[name], rtol=2e-5, atol=2e-6,
                                   err_msg=name)
    np.testing.assert_allclose(terms.kl, r["kl"], rtol=2e-5, atol=2e-6)
    loss, g = jax.value_and_grad(lambda s: tad_divergence(s, jnp.asarray(t), top_k=k))(
        jnp.asarray(s))
    want_loss, want_g = ref_loss_grad(s, t, k)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    np.testing.assert_allclose(g, want_g, rtol=2e-4, atol=2e-8)


@pytest.mark.parametrize("k", [1, 3])
def test_subnormal_teacher_values_keep_the_sums(k):
    # Subnormal teacher logits at the K-th place: XLA CPU compares them as 0 (denormals are
    # zero) while lax.top_k ranks them apart. Whichever head is taken, its rule must name K
    # entries and the head-independent quantities must hold.
    s, t = _teacher_with_zeros([1e-45, 0.0, 3e-45, 2e-45], seed=1)
    r = ref_terms(s, t, k)
    head, terms = core.pair_terms(jnp.asarray(s), jnp.asarray(t), k, 1.0)
    members = ~np.asarray(core.in_tail(jnp.asarray(t), head))
    np.testing.assert_array_equal(members.sum(-1), k)
    np.testing.assert_allclose(_got(terms, "lse_t"), r["lse_t"], rtol=2e-6)
    np.testing.assert_allclose(_got(terms, "lse_s"), r["lse_s"], rtol=2e-6)
    np.testing.assert_allclose(terms.kl, r["kl"], rtol=2e-5, atol=2e-6)


def test_signed_zero_tie_in_the_lax_top_k_path():
    # V short next to K takes lax.top_k (no blocks); 0.0 and -0.0 tie at the K-th place: the
    # lowest index wins and the Head's rule names exactly K entries (CPU: `_equal_zeros`).
    t = jnp.array([[-0.0, -1.0, 0.0, -2.0, -3.0, -4.0]])
    s = jnp.zeros_like(t)
    assert core._head_block(t.shape[-1], 1) is None
    head, _ = core.pair_terms(s, t, 1, 1.0)
    np.testing.assert_array_equal(head.idx_k, [[0]])
    members = ~np.asarray(core.in_tail(t, head))
    np.testing.assert_array_equal(members.sum(-1), 1)


def test_teacher_log_alpha_of_an_empty_row_is_minus_inf():
    # log α_T of a row with no entry (all -inf) is -inf (α_T = 0), as in `token_terms`, not NaN;
    # a row whose tail alone is -inf also has α_T = 0; other rows match the float64 reference.
    t = np.array([[-np.inf] * 6, [2.0, 1.0, -np.inf, -np.inf, -np.inf, -np.inf],
                  [0.5, -1.0, 3.0, 0.0, -2.0, 1.0]], np.float32)
    head = core.teacher_head(jnp.asarray(t), 2)
    got = np.asarray(core.teacher_log_alpha(jnp.asarray(t), head))
    assert np.isneginf(got[0]) and np.isneginf(got[1]), got
    want = ref_terms(np.zeros_like(t[2:]), t[2:], 2)["log_alpha_t"]
    np.testing.assert_allclose(got[2:], want, rtol=1e-6)
    terms = core.token_terms(jnp.zeros_like(t), jnp.asarray(t), head)
    np.testing.assert_array_equal(np.isneginf(terms.log_alpha_t), [True, True, False])


@pytest.mark.parametrize("vocab", [12, V])  # lax.top_k's top-(K+1) path; the two-level search
def test_tail_far_below_the_head_keeps_log_alpha(vocab):
    # Heads 1000 above their tails: α_T, α_S ≈ e^-1000 underflow as probabilities, so the tail
    # sums must be shifted by the tails' own maxima (the teacher's from its top-(K+1)): log α
    # stays exact, as do D_KL1 and D_KL2.
    rng = np.random.default_rng(4)
    t = rng.standard_normal((2, vocab)).astype(np.float32)
    s = rng.standard_normal((2, vocab)).astype(np.float32)
    t[:, [3, 7]] += 1000.0
    s[0, 3] += 1000.0  # the student's head is far above its tail on row 0 only
    k = 2
    with np.errstate(over="ignore"):  # e^(b − lse_tail) of head entries, dropped by a where
        r = ref_terms(s, t, k)
    # The fused loss's form (`from_matmul`) reduces the student's tail max online instead.
    for head, terms in (core.pair_terms(jnp.asarray(s), jnp.asarray(t), k, 1.0),
                        core.head_and_terms(jnp.asarray(s), jnp.asarray(t), k, from_matmul=True)):
        np.testing.assert_array_equal(np.sort(np.asarray(head.idx_k), -1), [[3, 7], [3, 7]])
        for name in ("log_alpha_t", "log_alpha_s"):
            np.testing.assert_allclose(_got(terms, name), r[name], rtol=1e-6, atol=1e-6,
                                       err_msg=name)
        # D_KL2 = C̃/Z̃_t − (lse_tail(b) − m_t) + (lse_tail(a) − m_s): brackets of ~1000 in f32.
        np.testing.assert_allclose(terms.kl2, r["kl2"], atol=5e-4)
        np.testing.assert_allclose(terms.kl1, r["kl1"], rtol=1e-4, atol=1e-30)


def test_online_logsumexp_reduce_matches_numpy():
    # `_reduce_lse_v`: (max, Σ e^(x − max)) merged online, beside plain sums, in one reduce.
    # Rows: ordinary; a spread of 2000 (e^-2000 terms vanish, the max's 1 stays); -inf entries;
    # all -inf (z = 0); one finite entry; ties at the max.
    rng = np.random.default_rng(7)
    x = (3.0 * rng.standard_normal((6, 301))).astype(np.float32)
    x[1, :150] -= 2000.0
    x[2, ::3] = -np.inf
    x[3] = -np.inf
    x[4, :] = -np.inf
    x[4, 17] = -5.0
    x[5, [4, 200]] = x[5].max() + 1.0
    w = rng.uniform(size=x.shape).astype(np.float32)
    m, z, (total,) = core._reduce_lse_v(jnp.asarray(x), (jnp.asarray(w),))
    want_m = x.max(-1)
    np.testing.assert_array_equal(m, want_m)
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        want_z = np.where(np.isneginf(want_m), 0.0,
                          np.exp(x64 - np.where(np.isneginf(want_m), 0.0, want_m)[:, None]).sum(-1))
    np.testing.assert_allclose(z, want_z, rtol=2e-6)
    np.testing.assert_allclose(total, w.astype(np.float64).sum(-1), rtol=2e-6)
