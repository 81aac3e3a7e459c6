"""Tests of tad_jax/fused.py: the chunked losses equal the unfused ones of tad_jax.losses.

References: `tad_divergence` / `kl_divergence` / `causal_lm_loss` / `distillation_loss` applied to
materialised logits `softcap(h @ W + b)` (their own tests check them against plain jnp), with
gradients from `jax.grad` through the matmul. Shapes are tiny; float32 comparisons at 1e-5.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tad_jax import fused, losses

V, DS, DT, K = 37, 8, 12, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(seed=0, shape=(3, 7), vocab=V, dtype=jnp.float32, masked_row=True):
    """Random hidden states, heads, biases, targets and a mask with one all-masked row."""
    ks = jax.random.split(jax.random.key(seed), 8)
    hs = jax.random.normal(ks[0], shape + (DS,))
    ht = jax.random.normal(ks[1], shape + (DT,))
    # Logits of order 3: a peaked but not degenerate teacher, so the tail matters.
    ws = (3.0 / np.sqrt(DS)) * jax.random.normal(ks[2], (DS, vocab))
    wt = (4.0 / np.sqrt(DT)) * jax.random.normal(ks[3], (DT, vocab))
    bs = 0.5 * jax.random.normal(ks[4], (vocab,))
    bt = 0.5 * jax.random.normal(ks[5], (vocab,))
    mask = jax.random.bernoulli(ks[6], 0.8, shape)
    if masked_row:
        mask = mask.at[1].set(False)
    targets = jax.random.randint(ks[7], shape, 0, vocab)
    cast = lambda x: x.astype(dtype)
    return dict(
        hs=hs, ws=cast(ws), bs=cast(bs), ht=ht, wt=cast(wt), bt=cast(bt), mask=mask, targets=targets
    )


def _logits(h, w, b, cap):
    z = jnp.matmul(h.astype(jnp.float32), w.astype(jnp.float32)) + b.astype(jnp.float32)
    return z if cap is None else cap * jnp.tanh(z / cap)


def _unfused(name, x, cap, student_head_grad=True, **kw):
    """The reference loss as a function of (hs, ws, bs), teacher logits materialised too."""
    zt = lambda: _logits(x["ht"], x["wt"], x["bt"], cap)

    def f(hs, ws, bs):
        zs = _logits(hs, ws, bs, cap)
        if name == "tad":
            return losses.tad_divergence(zs, zt(), x["mask"], **kw)
        if name == "kl":
            return losses.kl_divergence(zs, zt(), x["mask"], **kw)
        if name == "clm":
            return losses.causal_lm_loss(zs, x["targets"], x["mask"], **kw)
        total, parts = losses.distillation_loss(zs, zt(), x["targets"], x["mask"], **kw)
        return total, {"clm": parts["clm"], "div": parts["div"]}

    return f


def _fused(name, x, cap, chunk_size, **kw):
    common = dict(chunk_size=chunk_size, student_bias=None, final_logit_softcap=cap, **kw)

    def f(hs, ws, bs):
        common["student_bias"] = bs
        if name == "clm":
            return fused.fused_causal_lm_loss(hs, ws, x["targets"], x["mask"], **common)
        args = (hs, ws, x["ht"], x["wt"])
        common["teacher_bias"] = x["bt"]
        if name == "tad":
            return fused.fused_tad_loss(*args, x["mask"], **common)
        if name == "kl":
            return fused.fused_kl_loss(*args, x["mask"], **common)
        return fused.fused_distillation_loss(*args, x["targets"], x["mask"], **common)

    return f


def _value_and_grads(f, x, ct_seed=1):
    """Value and the VJP of (hs, ws, bs) for a random cotangent (also per token for "none")."""
    out, vjp = jax.vjp(f, x["hs"], x["ws"], x["bs"])
    total = out[0] if isinstance(out, tuple) else out
    ct = jax.random.uniform(jax.random.key(ct_seed), total.shape, minval=0.5, maxval=1.5)
    ct_out = (ct, jax.tree.map(jnp.zeros_like, out[1])) if isinstance(out, tuple) else ct
    return out, vjp(ct_out)


def _assert_match(name, x, chunk_size, cap=None, tol=TOL, **kw):
    ref_out, ref_g = _value_and_grads(jax.jit(_unfused(name, x, cap, **kw)), x)
    out, g = _value_and_grads(jax.jit(_fused(name, x, cap, chunk_size, **kw)), x)
    np.testing.assert_allclose(
        np.asarray(out[0] if isinstance(out, tuple) else out, np.float32),
        np.asarray(ref_out[0] if isinstance(out, tuple) else ref_out),
        **tol,
    )
    if isinstance(out, tuple):
        for k in ("clm", "div"):
            np.testing.assert_allclose(out[1][k], ref_out[1][k], **tol, err_msg=k)
    if not kw.get("student_head_grad", True):  # a frozen head: zero cotangent, not computed
        assert not np.any(np.asarray(g[1])), "d student_head"
        g, ref_g = (g[0], g[2]), (ref_g[0], ref_g[2])
    names = ("d student_hidden", "d student_head", "d student_bias")
    for what, a, b in zip(names if len(g) == 3 else names[::2], g, ref_g, strict=True):
        assert a.dtype == b.dtype, what
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), **tol, err_msg=what
        )


# Rows of T = 7 positions, 3 rows. chunk_size < T cuts the time axis (rows span chunks: teacher
# pre-pass for β(X)): 3 -> 1 position per row per step (7 steps), 6 -> 2 (4 steps, the last
# padded). chunk_size >= T takes whole rows per step: 9 -> 1 row (3 steps), 14 -> 2 rows (2 steps,
# a padded row), 21 and 1024 -> all 3 rows in one step.
CHUNKS = [3, 6, 9, 14, 21, 1024]


@pytest.mark.parametrize(
    "chunk_size, reduction",
    [(c, "mean") for c in CHUNKS] + [(c, r) for c in (6, 21) for r in ("sum", "none")],
)
def test_tad_matches_unfused(chunk_size, reduction):
    x = _inputs()
    _assert_match("tad", x, chunk_size, top_k=K, beta=2.0, reduction=reduction)


@pytest.mark.parametrize("chunk_size", [6, 21])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kl_and_clm_match_unfused(chunk_size, reduction):
    x = _inputs(seed=1)
    _assert_match("kl", x, chunk_size, temperature=1.5, reduction=reduction)
    _assert_match("clm", x, chunk_size, reduction=reduction)


@pytest.mark.parametrize("divergence", ["tad", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_matches_unfused(divergence, temperature):
    x = _inputs(seed=2)
    _assert_match(
        "distill", x, 9, divergence=divergence, top_k=K, beta=3.0, temperature=temperature
    )


@pytest.mark.parametrize("chunk_size", [6, 21])
def test_softcap_matches_unfused(chunk_size):
    x = _inputs(seed=3)
    # cap 2 << the logits' spread of ~3-4: the tanh is far from linear, its derivative matters.
    _assert_match("tad", x, chunk_size, cap=2.0, top_k=K, temperature=1.3)
    _assert_match("distill", x, chunk_size, cap=2.0, divergence="tad", top_k=K)


def test_leading_dims_and_edge_settings():
    """No batch axis, two batch axes, K = 0, an eps_alpha floor that binds, a float mask."""
    x = _inputs(seed=4, shape=(7,), masked_row=False)
    _assert_match("tad", x, 3, top_k=K)
    x = _inputs(seed=5, shape=(2, 2, 5))
    _assert_match("tad", x, 4, top_k=0)
    _assert_match("tad", x, 4, top_k=K, eps_alpha=0.9)
    x["mask"] = x["mask"].astype(jnp.float32)
    _assert_match("distill", x, 4, top_k=K)


def test_peaked_teacher_and_padded_vocabulary():
    """α_T ≈ 0 rows and -inf (padded) vocabulary entries: finite, still equal to the reference."""
    x = _inputs(seed=6)
    x["wt"] = 20.0 * x["wt"]  # teacher logits of order 100: the tail mass underflows for many rows
    pad = jnp.zeros((V,)).at[-5:].set(-jnp.inf)
    x["bt"], x["bs"] = x["bt"] + pad, x["bs"] + pad
    _assert_match("tad", x, 6, top_k=K)
    g = jax.grad(_fused("tad", x, None, 6, top_k=K), argnums=(0, 1, 2))(x["hs"], x["ws"], x["bs"])
    assert all(bool(jnp.isfinite(a).all()) for a in g)


def test_teacher_gets_zero_cotangent():
    x = _inputs(seed=7)

    def f(ht, wt, bt):
        return fused.fused_tad_loss(
            x["hs"],
            x["ws"],
            ht,
            wt,
            x["mask"],
            top_k=K,
            chunk_size=6,
            student_bias=x["bs"],
            teacher_bias=bt,
        )

    for g in jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x["ht"], x["wt"], x["bt"]):
        assert not np.any(np.asarray(g))


def test_bf16_heads():
    """bf16 heads and hidden states: the fused loss is the float32 loss of the bf16 values.

    The head matmuls accumulate in float32, so values match the float32 reference of the same
    (bf16-representable) numbers to float32 accuracy. The cotangents come back in bf16, so they
    match to one rounding to bf16 (7 stored mantissa bits: at most 2^-8 relative) plus float32
    noise.
    """
    x = _inputs(seed=8, dtype=jnp.bfloat16)
    x["hs"], x["ht"] = x["hs"].astype(jnp.bfloat16), x["ht"].astype(jnp.bfloat16)
    f = jax.jit(_fused("tad", x, None, 6, top_k=K))
    out, g = _value_and_grads(f, x)
    assert [a.dtype for a in g] == [jnp.bfloat16] * 3
    up = {k: (v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v) for k, v in x.items()}
    ref_out, ref_g = _value_and_grads(jax.jit(_unfused("tad", up, None, top_k=K)), up)
    np.testing.assert_allclose(out, ref_out, **TOL)
    for a, b in zip(g, ref_g, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2.0**-8, atol=1e-5)


@pytest.mark.parametrize("shape, chunk_size", [((8, 6), 16), ((16, 6), 48)])
def test_sharded_inputs_match_unsharded(shape, chunk_size):
    """Rows sharded over the 8 CPU devices give the unsharded result (and stay sharded).

    (8, 6) with 16 tokens per step cuts the time axis (teacher pre-pass); (16, 6) with 48 takes 8
    whole rows per step, one from each shard.
    """
    x = _inputs(seed=9, shape=shape)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    xs = dict(
        x,
        hs=jax.device_put(x["hs"], rows),
        ht=jax.device_put(x["ht"], rows),
        mask=jax.device_put(x["mask"], rows),
        targets=jax.device_put(x["targets"], rows),
    )
    f = _fused("distill", x, None, chunk_size, top_k=K)
    (ref, _), ref_g = _value_and_grads(jax.jit(f), x)
    f = _fused("distill", xs, None, chunk_size, top_k=K)
    (out, _), g = _value_and_grads(jax.jit(f), xs)
    np.testing.assert_allclose(out, ref, **TOL)
    for a, b in zip(g, ref_g, strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    assert g[0].sharding.is_equivalent_to(rows, g[0].ndim)


@pytest.mark.parametrize("reduction, in_context", [("mean", False), ("none", True)])
def test_explicit_mesh_axes_match_unsharded(reduction, in_context):
    """Rows and heads on a mesh of Explicit axes (rows over "data", V over "model") give the
    unsharded value and gradients, with the gradients sharded as their inputs; the mesh as the
    context (`jax.set_mesh`) or only in the arrays' types. This was a ShardingTypeError."""
    x = _inputs(seed=3, shape=(8, 6), vocab=40)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    rows, cols = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "model"))
    put = {"hs": rows, "ht": rows, "mask": rows, "targets": rows, "ws": cols, "wt": cols}
    xs = {k: jax.device_put(v, put[k]) if k in put else v for k, v in x.items()}

    def value_and_grads(x):
        f = _fused("distill", x, None, 16, top_k=K, reduction=reduction)
        ct = jax.random.uniform(jax.random.key(1), x["mask"].shape, minval=0.5, maxval=1.5)
        loss = lambda hs, ws: jnp.sum(f(hs, ws, x["bs"])[0] * (ct if reduction == "none" else 1))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x["hs"], x["ws"])

    ref, ref_g = value_and_grads(x)
    with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
        out, g = value_and_grads(xs)
    np.testing.assert_allclose(out, ref, **TOL)
    for a, b, want in zip(g, ref_g, (rows, cols), strict=True):
        np.testing.assert_allclose(a, b, **TOL)
        assert a.sharding.is_equivalent_to(want, a.ndim)


def test_no_n_by_v_temporary():
    """XLA's temporary bytes stay below one [N, V] float32 array (and flat as N grows 4x)."""
    v, d, c = 4096, 16, 64

    def temp_bytes(n):
        h = jax.ShapeDtypeStruct((1, n, d), jnp.float32)
        w = jax.ShapeDtypeStruct((d, v), jnp.float32)
        m = jax.ShapeDtypeStruct((1, n), jnp.float32)
        f = jax.grad(
            lambda hs, ws, ht, wt, m: fused.fused_tad_loss(hs, ws, ht, wt, m, chunk_size=c), (0, 1)
        )
        return jax.jit(f).lower(h, w, h, w, m).compile().memory_analysis().temp_size_in_bytes

    small, big = temp_bytes(1024), temp_bytes(4096)
    assert big < 4096 * v * 4 / 4, big
    assert big < 1.5 * small, (small, big)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(ws=jnp.zeros((DS + 1, V))), "student_head"),
        (dict(ws=jnp.zeros((V, DS))), "transpose"),
        (dict(wt=jnp.zeros((DT, V + 1))), "vocabulary"),
        (dict(ht=jnp.zeros((3, 6, DT))), "teacher_hidden"),
        (dict(mask=jnp.ones((3, 6))), "mask"),
        (dict(bs=jnp.zeros((V + 1,))), "student_bias"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(top_k=V), "top_k"),
        (dict(top_k=-1), "top_k"),
        (dict(beta=0.0), "beta"),
        (dict(temperature=-1.0), "temperature"),
        (dict(eps_alpha=0.0), "eps_alpha"),
        (dict(reduction="avg"), "reduction"),
        (dict(final_logit_softcap=0.0), "softcap"),
    ],
)
def test_bad_input_raises(change, match):
    x = _inputs()
    kw = dict(top_k=K, chunk_size=6)
    kw.update({k: change.pop(k) for k in list(change) if k not in x})
    x.update(change)
    with pytest.raises(ValueError, match=match):
        fused.fused_tad_loss(
            x["hs"], x["ws"], x["ht"], x["wt"], x["mask"], student_bias=x["bs"], **kw
        )


def test_bad_targets_and_divergence_raise():
    x = _inputs()
    with pytest.raises(ValueError, match="integer"):
        fused.fused_causal_lm_loss(x["hs"], x["ws"], x["targets"].astype(jnp.float32))
    with pytest.raises(ValueError, match="targets"):
        fused.fused_causal_lm_loss(x["hs"], x["ws"], x["targets"][:, :-1])
    with pytest.raises(ValueError, match="divergence"):
        fused.fused_distillation_loss(
            x["hs"], x["ws"], x["ht"], x["wt"], x["targets"], divergence="jsd"
        )


@pytest.mark.parametrize(
    "name, chunk_size, reduction",
    [("tad", 6, "mean"), ("tad", 9, "none"), ("distill", 3, "sum"), ("tad", 21, "mean")],
)
def test_frozen_head(name, chunk_size, reduction):
    """student_head_grad=False: same dh and db as the reference, and a zero dW."""
    x = _inputs(seed=10)
    _assert_match(name, x, chunk_size, top_k=K, reduction=reduction, student_head_grad=False)


# ---------------------------------------------------------------------------------------------
# One kernel: ties, padding, chunking, segments (issue 11)
# ---------------------------------------------------------------------------------------------


def _identity_head_case(t_logits, s_logits):
    """Hidden states = one-hot rows, heads = the logits: the fused logits equal the given ones."""
    n, v = t_logits.shape
    h = jnp.eye(n, dtype=jnp.float32)[None]  # [1, n, n]
    return h, jnp.asarray(s_logits, jnp.float32), h, jnp.asarray(t_logits, jnp.float32)


def test_tie_at_kth_place_fused_equals_unfused():
    """V=1024, K=2: teacher 5.0 at 70, 3.0 at 5 and 71 (a tie at the 2nd place), student 4.0 at 5.

    The lowest index (5) wins the tie everywhere; float64 numpy reference of that head.
    """
    t = np.zeros((1, 1024))
    t[0, 70], t[0, 5], t[0, 71] = 5.0, 3.0, 3.0
    s = np.zeros((1, 1024))
    s[0, 5] = 4.0
    hs, ws, ht, wt = _identity_head_case(t, s)
    unfused = losses.tad_divergence(jnp.asarray(s)[None], jnp.asarray(t)[None], top_k=2)
    for c in (1, 7):
        got = fused.fused_tad_loss(hs, ws, ht, wt, top_k=2, chunk_size=c)
        np.testing.assert_allclose(got, unfused, rtol=1e-6)
    # Reference: head I = {70, 5}; one position, so β(X) = β / α_T and L = D_KL1 + β·D_KL2.
    pt, ps = np.exp(t - t.max()), np.exp(s - s.max())
    pt, ps = pt / pt.sum(), ps / ps.sum()
    head = np.zeros(1024, bool)
    head[[70, 5]] = True
    at, as_ = pt[0, ~head].sum(), ps[0, ~head].sum()
    kl1 = np.sum(pt[0, head] * np.log(pt[0, head] / ps[0, head])) + at * np.log(at / as_)
    ptt, pst = pt[0, ~head] / at, ps[0, ~head] / as_
    kl2 = np.sum(ptt * np.log(ptt / pst))
    np.testing.assert_allclose(unfused, kl1 + 2.0 * kl2, rtol=1e-5)


@pytest.mark.parametrize("k", [3, 5])
def test_random_tie_heavy_rows_fused_equals_unfused(k):
    """Integer-valued logits (many ties at the K-th place), V split in chunks or not."""
    ks = jax.random.split(jax.random.key(k), 4)
    v, shape = 256, (2, 6)
    t = jnp.round(1.5 * jax.random.normal(ks[0], shape + (v,)))
    s = jnp.round(1.5 * jax.random.normal(ks[1], shape + (v,)))
    m = jax.random.bernoulli(ks[2], 0.8, shape)
    want, want_g = jax.value_and_grad(losses.tad_divergence)(s, t, m, top_k=k)
    eye = jnp.broadcast_to(jnp.eye(6, dtype=jnp.float32), shape + (6,))
    for c in (1, 4, 12):
        # Per-row heads: hidden = one-hot positions, head = that row's logits, as h @ W.
        def f(s_, c=c):
            return sum(fused.fused_tad_loss(eye[r:r + 1], s_[r], eye[r:r + 1], t[r], m[r:r + 1],
                                            top_k=k, chunk_size=c, reduction="sum")
                       for r in range(2)) / jnp.sum(m)

        got, g = jax.value_and_grad(f)(s)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)


def test_independent_of_vocab_padding_and_chunk_size():
    """Padding V with student -inf columns (any teacher value there) changes nothing."""
    x = _inputs(seed=11)
    ref = _fused("tad", x, None, 6, top_k=K)
    ref_out, ref_g = _value_and_grads(jax.jit(ref), x)
    for pad, c in ((0, 3), (0, 21), (27, 6), (91, 21)):
        y = dict(x)
        y["ws"] = jnp.concatenate([x["ws"], jnp.zeros((DS, pad))], 1)
        y["bs"] = jnp.concatenate([x["bs"], jnp.full((pad,), -jnp.inf)])
        y["wt"] = jnp.concatenate([x["wt"], jnp.ones((DT, pad))], 1)  # large teacher values
        y["bt"] = jnp.concatenate([x["bt"], jnp.full((pad,), 9.0)])
        out, g = _value_and_grads(jax.jit(_fused("tad", y, None, c, top_k=K)), y)
        np.testing.assert_allclose(out, ref_out, **TOL)
        np.testing.assert_allclose(g[0], ref_g[0], **TOL)
        np.testing.assert_allclose(g[1][:, :V], ref_g[1], **TOL)
        np.testing.assert_allclose(g[2][:V], ref_g[2], **TOL)
        assert not np.any(np.asarray(g[1][:, V:])) and not np.any(np.asarray(g[2][V:]))
        # The unfused loss on the same padded logits, too.
        zs = _logits(y["hs"], y["ws"], y["bs"], None)
        zt = _logits(y["ht"], y["wt"], y["bt"], None)
        np.testing.assert_allclose(losses.tad_divergence(zs, zt, y["mask"], top_k=K), ref_out,
                                   **TOL)


def test_issue_padded_student_bias_gives_zero():
    """hidden 1, V=3, K=1, both heads zeros, student bias [0, 0, -inf]: 0.0, not inf."""
    h = jnp.ones((1, 1, 1))
    w = jnp.zeros((1, 3))
    bs = jnp.array([0.0, 0.0, -jnp.inf])
    for div in ("tad", "kl"):
        kw = dict(top_k=1) if div == "tad" else {}
        f = fused.fused_tad_loss if div == "tad" else fused.fused_kl_loss
        val, g = jax.value_and_grad(lambda hs, f=f, kw=kw: f(hs, w, h, w, student_bias=bs,
                                                              **kw))(h)
        assert float(val) == 0.0 and np.all(np.isfinite(g)), (div, val, g)
    zs, zt = jnp.array([[[0.0, 0.0, -jnp.inf]]]), jnp.zeros((1, 1, 3))
    for fn in (losses.kl_divergence, losses.reverse_kl_divergence, losses.js_divergence):
        val, g = jax.value_and_grad(fn)(zs, zt)
        assert abs(float(val)) < 1e-7 and np.all(np.isfinite(g)), (fn, val, g)
    assert abs(float(losses.tad_divergence(zs, zt, top_k=1))) < 1e-7


def test_mismatched_heads_advice_works():
    """The error's advice (pad the student's head with zero columns and a -inf bias) gives the
    sliced result."""
    x = _inputs(seed=12)
    small_w, small_b = x["ws"][:, :30], x["bs"][:30]
    with pytest.raises(ValueError, match="-inf"):
        fused.fused_tad_loss(x["hs"], small_w, x["ht"], x["wt"], top_k=K)
    padded_w = jnp.concatenate([small_w, jnp.zeros((DS, V - 30))], 1)
    padded_b = jnp.concatenate([small_b, jnp.full((V - 30,), -jnp.inf)])
    for div, f in (("tad", fused.fused_tad_loss), ("kl", fused.fused_kl_loss)):
        kw = dict(top_k=K) if div == "tad" else {}
        got = f(x["hs"], padded_w, x["ht"], x["wt"], x["mask"], student_bias=padded_b,
                teacher_bias=x["bt"], chunk_size=6, **kw)
        want = f(x["hs"], small_w, x["ht"], x["wt"][:, :30], x["mask"], student_bias=small_b,
                 teacher_bias=x["bt"][:30], chunk_size=6, **kw)
        np.testing.assert_allclose(got, want, **TOL)


def _segment_reference(log_alpha_t, mask, seg, beta, eps):
    """β(X) per position, X = the positions of a row with the same segment id (numpy)."""
    at, m, seg = np.exp(np.asarray(log_alpha_t, np.float64)), np.asarray(mask), np.asarray(seg)
    out = np.zeros(at.shape)
    for r in range(at.shape[0]):
        for sid in np.unique(seg[r]):
            here = seg[r] == sid
            valid = here & (m[r] > 0)
            mean = at[r][valid].mean() if valid.any() else 0.0
            out[r][here] = beta / max(mean, eps)
    return out


@pytest.mark.parametrize("chunk_size", [3, 7, 21])
def test_segment_scope_beta_matches_numpy_and_unfused(chunk_size):
    x = _inputs(seed=13)
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1], [1, 2, 2, 2, 2, 0, 0]])
    kw = dict(top_k=K, beta_scope="segment", segment_ids=seg)
    zs = _logits(x["hs"], x["ws"], x["bs"], None)
    zt = _logits(x["ht"], x["wt"], x["bt"], None)
    comp = losses.tad_components(zs, zt, x["mask"], top_k=K, beta_scope="segment",
                                 segment_ids=seg)
    want_beta = _segment_reference(jnp.log(comp["alpha_t"] + (1 - x["mask"])), x["mask"], seg,
                                   2.0, 1e-6)
    valid = np.asarray(x["mask"]) > 0
    np.testing.assert_allclose(np.asarray(comp["beta_x"])[valid], want_beta[valid], rtol=1e-5)
    # Per-token loss against the numpy β(X): D_KL1 + β(X)·α_T·D_KL2.
    want_tok = np.where(valid, comp["kl1"] + want_beta * comp["alpha_t"] * comp["kl2"], 0.0)
    got_tok = losses.tad_divergence(zs, zt, x["mask"], reduction="none", **kw)
    np.testing.assert_allclose(got_tok, want_tok, rtol=1e-5, atol=1e-6)
    row_tok = losses.tad_divergence(zs, zt, x["mask"], reduction="none", top_k=K)
    assert not np.allclose(got_tok, row_tok)  # the scope matters on this data
    _assert_match("tad", dict(x), chunk_size, **kw)


# ---------------------------------------------------------------------------------------------
# The teacher pre-pass over vocabulary blocks (rows spanning chunks)
# ---------------------------------------------------------------------------------------------


def _np_tail(t, k):
    """float64 numpy reference: the head (K largest, lowest index first on ties) and log α_T."""
    t = np.asarray(t, np.float64)
    order = np.lexsort((np.broadcast_to(np.arange(t.shape[-1]), t.shape), -t), axis=-1)
    head = order[..., :k]
    tail = np.ones(t.shape, bool)
    np.put_along_axis(tail, head, False, axis=-1)

    def lse(x, where):
        x = np.where(where, x, -np.inf)
        m = x.max(-1, keepdims=True)
        return np.log(np.exp(x - m).sum(-1)) + m[..., 0]

    return head, lse(t, tail) - lse(t, np.ones(t.shape, bool))


def _blocked(t, k, block, temperature=1.0, bias=None, cap=None):
    """`fused._teacher_tail` of the logits t [N, V] (hidden = identity, head = t)."""
    cfg = fused._Config("tad", False, fused.core.TADConfig(top_k=k, temperature=temperature), 1,
                        cap, "mean")
    eye = jnp.eye(t.shape[0], dtype=jnp.float32)
    return jax.jit(fused._teacher_tail, static_argnums=(0, 4))(
        cfg, jnp.asarray(t, jnp.float32), None if bias is None else jnp.asarray(bias), eye, block)


@pytest.mark.parametrize("block", [10, 8, 37])  # 37 = V (one block); 8 and 10 do not divide V
def test_pre_pass_blocks_match_numpy(block):
    """Random logits, a -inf (padded) column and integer logits with many ties at the K-th place,
    against the float64 reference and the one-block kernel (`tad_core`), head indices too."""
    ks = jax.random.split(jax.random.key(14), 2)
    v = 37
    t = np.asarray(3.0 * jax.random.normal(ks[0], (6, v)), np.float64)
    t[1] = np.round(np.asarray(1.5 * jax.random.normal(ks[1], (v,))))  # tie-heavy
    t[2] = 0.0  # all tied
    bias = np.zeros(v, np.float32)
    bias[-3:] = -np.inf  # padded columns (the last block's too)
    for k in (1, 4, 7):
        log_at, head = _blocked(t, k, block, bias=bias)
        want_head, want = _np_tail(t + bias, k)
        np.testing.assert_array_equal(head.idx_k, want_head)
        np.testing.assert_allclose(log_at, want, rtol=1e-5, atol=1e-5)
        b = jnp.asarray(t + bias, jnp.float32)
        one = fused.core.teacher_log_alpha(b, fused.core.teacher_head(b, k))
        np.testing.assert_allclose(log_at, one, rtol=1e-5, atol=1e-5)


def test_pre_pass_tie_across_block_boundary():
    """Ties at the K-th place split over blocks (of 10): the lowest index wins, as over all V."""
    t = np.zeros((3, 40))
    t[0, [25, 9, 10]] = [5.0, 3.0, 3.0]  # the tie at the 2nd place straddles blocks 0 and 1
    t[1, [39, 19, 20, 35]] = [5.0, 3.0, 3.0, 3.0]  # three blocks, the winner in block 1
    t[2, [30, 31, 2]] = [3.0, 3.0, 1.0]  # the earlier block's entry loses on value, not index
    log_at, head = _blocked(t, 2, 10)
    np.testing.assert_array_equal(head.idx_k, [[25, 9], [39, 19], [30, 31]])
    np.testing.assert_allclose(log_at, _np_tail(t, 2)[1], rtol=1e-6)


def test_pre_pass_temperature_bias_softcap_and_k0():
    """τ ≠ 1, a bias with -inf (a padded student column merged in), a soft-cap; K = 0 gives 0."""
    ks = jax.random.split(jax.random.key(15), 2)
    t = np.asarray(4.0 * jax.random.normal(ks[0], (5, 37)), np.float64)
    bias = np.array(jax.random.normal(ks[1], (37,)), np.float32)
    bias[[3, 30]] = -np.inf
    log_at, _ = _blocked(t, 3, 8, temperature=2.5, bias=bias)
    np.testing.assert_allclose(log_at, _np_tail((t + bias) / 2.5, 3)[1], rtol=1e-5, atol=1e-6)
    log_at, _ = _blocked(t, 3, 8, cap=2.0)
    np.testing.assert_allclose(log_at, _np_tail(2.0 * np.tanh(t / 2.0), 3)[1], rtol=1e-5,
                               atol=1e-6)
    log_at, head = _blocked(t, 0, 8)
    assert head is None and not np.any(np.asarray(log_at))


def test_vocab_block_size():
    """N·Vb ≈ chunk_size·V (one chunk's logits), > K, lane-aligned unless it divides V."""
    assert fused._vocab_block(4096, 256000, 512, 10) == 32000
    assert fused._vocab_block(21, 37, 6, 4) == 10  # blocks 0, 10, 20 and 27 (clamped)
    assert fused._vocab_block(1 << 20, 32000, 512, 20) == 21  # 15 columns would be < K + 1
    assert fused._vocab_block(1 << 16, 256000, 512, 10) == 2000  # divides V
    assert fused._vocab_block(1 << 16, 250000, 512, 10) == 2048  # lanes; the last overlaps
    assert fused._vocab_block(1 << 20, 100, 1, 20) == 21
    assert fused._vocab_block(3, 37, 6, 4) == 37


def test_rows_spanning_chunks_under_x64(x64):
    # The pre-pass's block index is int32 whatever jax_enable_x64 says (it crashed with x64 on).
    x = {k: (v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v)
         for k, v in _inputs().items()}
    fused_f, unfused_f = _fused("tad", x, None, 3, top_k=K), _unfused("tad", x, None, top_k=K)
    for f in (fused_f, unfused_f):  # rows of 7 positions in chunks of 3: the blocked pre-pass
        assert f(x["hs"], x["ws"], x["bs"]).dtype == jnp.float32
    got, got_g = jax.value_and_grad(fused_f)(x["hs"], x["ws"], x["bs"])
    want, want_g = jax.value_and_grad(unfused_f)(x["hs"], x["ws"], x["bs"])
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(got_g, want_g, **TOL)
