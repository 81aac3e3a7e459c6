"""The Pallas TPU kernel (`tad_jax.tpu_kernel`): the teacher's top-(K+1) and the pass of sums.

On CPU the kernel runs in Pallas' interpreter; it must give XLA's path (`tad_core._sorted_terms`
on `tad_core.top_k`) exactly in its head and to rounding in its terms, and a float64 numpy
reference from the definitions (TAD_SPEC.md). The TPU compile is checked ahead of time.
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tad_jax import fused, targets, tpu_kernel
from tad_jax import tad_core as core


def _reference(a, b, k):
    """float64 per-row head (lowest index on ties) and D_KL1, D_KL2, log α_T, log α_S."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    heads, out = [], []
    for x, y in zip(a, b, strict=True):
        order = np.lexsort((np.arange(y.size), -y))  # value desc (-0.0 = 0.0), index asc
        head = np.sort(order[:k])
        heads.append(order[:k])
        tail = np.ones(y.size, bool)
        tail[head] = False

        def lse(v, where):
            v = v[where & (v > -np.inf)]
            if v.size == 0:
                return -np.inf
            m = v.max()
            return m + np.log(np.exp(v - m).sum())

        every = np.ones(y.size, bool)
        lt, ls = lse(y, every), lse(x, every)
        if lt == -np.inf:  # no teacher entry: every term 0, α = 0
            out.append((0.0, 0.0, -np.inf, -np.inf))
            continue
        ltt, lst = lse(y, tail), lse(x, tail)
        log_at, log_as = ltt - lt, lst - ls
        live = y > -np.inf  # p_T > 0 (the student is finite there)
        kl1 = sum(np.exp(y[i] - lt) * ((y[i] - lt) - (x[i] - ls)) for i in head if live[i])
        kl2 = 0.0
        if ltt > -np.inf:
            kl1 += np.exp(log_at) * (log_at - log_as)
            t = tail & live
            kl2 = np.sum(np.exp(y[t] - ltt) * ((y[t] - ltt) - (x[t] - lst)))
        out.append((kl1, kl2, log_at, log_as))
    return np.array(heads), np.array(out)


def one_device(topology):
    """A replicated sharding on one device of a TPU topology, for ahead-of-time compiles."""
    device = targets.resolve_target(topology).devices[0]
    return jax.sharding.NamedSharding(jax.sharding.Mesh([device], ("x",)),
                                      jax.sharding.PartitionSpec())


def _check(a, b, k):
    a, b = core.tempered_pair(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 1.0)
    head, terms = tpu_kernel.head_and_terms(a, b, k, interpret=True)
    want_head, want_terms = core._sorted_terms(a, b, *core.top_k(b, k + 1))
    np.testing.assert_array_equal(head.idx_k, want_head.idx_k)
    np.testing.assert_array_equal(head.kth, want_head.kth)
    np.testing.assert_array_equal(head.last, want_head.last)
    for got, want, name in zip(terms, want_terms, terms._fields, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)
    ref_head, ref = _reference(a, b, k)
    np.testing.assert_array_equal(head.idx_k, ref_head)
    got = np.stack([terms.kl1, terms.kl2, terms.log_alpha_t, terms.log_alpha_s], -1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    return head, terms


def test_issue_tie_case():
    # Issue 11: teacher 5.0 at 70, 3.0 at 5 and 71; student 4.0 at 5; V = 1024, K = 2.
    t, s = np.zeros((1, 1024)), np.zeros((1, 1024))
    t[0, 70], t[0, 5], t[0, 71], s[0, 5] = 5.0, 3.0, 3.0, 4.0
    head, _ = _check(s, t, 2)
    assert head.idx_k.tolist() == [[70, 5]]


@pytest.mark.parametrize("k", [3, 5])
def test_tie_heavy_integer_rows(k):
    rng = np.random.default_rng(k)
    s = rng.normal(size=(13, 1000)) * 2  # rows not a multiple of 8, V not of 128
    t = rng.integers(-4, 3, size=(13, 1000)).astype(float)
    t[3] = 0.0  # a whole row tied
    t[4, ::7] = 2.0  # ties at the K-th place across lane blocks
    _check(s, t, k)


def test_blocks_below_the_lane_bound_skipped():
    # Most [8, 128] blocks hold no entry >= τ (the (K+1)-th largest lane maximum) and are
    # skipped: Gaussian rows, a head in the last block only, and τ tied with many entries.
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(8, 5000)), rng.normal(size=(8, 5000))
    t[1, :4990] -= 50.0
    t[2] = np.round(t[2])
    _check(s, t, 10)


def test_signed_zeros_tie_as_equal():
    t = np.full((2, 384), -1.0)
    t[0, [3, 130, 200, 260]] = [-0.0, 0.0, -0.0, 0.0]  # K = 2 takes 3 and 130
    t[1, [5, 6, 300]] = [0.0, -0.0, 1.0]
    s = np.random.default_rng(0).normal(size=t.shape)
    head, _ = _check(s, t, 2)
    assert head.idx_k.tolist() == [[3, 130], [300, 5]]


def test_infinities_padding_and_a_far_tail():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(6, 300)), rng.normal(size=(6, 300))
    s[0, 250:] = -np.inf  # a padded student vocabulary: dropped from both sides
    t[1, ::2] = -np.inf  # teacher zeros where the student is finite
    t[2] = -np.inf  # a teacher row with no entry: terms 0, α = 0
    t[3, :] = -np.inf
    t[3, [7, 290]] = [1.0, 0.5]  # fewer finite entries than K + 1: -inf ties, lowest index
    t[4], s[4] = -1000.0, -1000.0  # a tail 1000 nats below the head
    t[4, [10, 140, 299]], s[4, [10, 140, 299]] = 0.0, [0.5, 0.0, -0.5]
    head, terms = _check(s, t, 4)
    assert head.idx_k[3].tolist() == [7, 290, 0, 1]
    assert terms.kl1[2] == 0 and terms.kl2[2] == 0 and terms.log_alpha_t[2] == -np.inf
    assert np.isfinite(terms.kl2[4]) and terms.log_alpha_t[4] < -990


def test_student_padding_merged_in_vmem():
    # merge=True takes the raw logits and merges the student's -inf entries into b in VMEM
    # (`tad_core.pair_terms`): the same head and terms as the kernel on a merged copy.
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(9, 300)), rng.integers(-2, 2, size=(9, 300)).astype(float)
    s[0, 250:] = -np.inf  # a padded student vocabulary
    s[1, ::3] = -np.inf  # scattered, over the teacher's top entries too
    s[2] = -np.inf  # nothing left on either side
    t[3, :200] = -np.inf
    s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    head, terms = tpu_kernel.head_and_terms(s, t, 5, merge=True, interpret=True)
    want_head, want_terms = _check(*core.tempered_pair(s, t, 1.0), 5)
    for got, want in zip(head, want_head, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want, name in zip(terms, want_terms, terms._fields, strict=True):
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_bfloat16_logits_widened_in_vmem():
    # bf16 logits are read as they are and widened in VMEM (exact): the same head and terms as
    # the kernel on float32 copies, and as XLA's path on the bf16 logits.
    rng = np.random.default_rng(6)
    s = jnp.asarray(rng.normal(size=(10, 400)), jnp.bfloat16).at[0, 350:].set(-jnp.inf)
    t = jnp.asarray(rng.integers(-3, 3, size=(10, 400)), jnp.bfloat16)  # ties everywhere
    t = t.at[1].multiply(1e-3).at[1].add(300.0)  # bf16 rounding makes more ties
    head, terms = tpu_kernel.head_and_terms(s, t, 7, merge=True, interpret=True)
    want_head, want_terms = _check(*core.tempered_pair(s, t, 1.0), 7)
    xla_head, xla_terms = tpu_kernel._by_xla(s, t, 7, merge=True)
    for got, want, xla in zip(head, want_head, xla_head, strict=True):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, xla)
    for got, want, xla, name in zip(terms, want_terms, xla_terms, terms._fields, strict=True):
        assert got.dtype == jnp.float32, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        np.testing.assert_allclose(got, xla, rtol=2e-5, atol=2e-5, err_msg=name)


def test_more_places_than_lane_blocks():
    # K + 1 = 12 entries from 2 blocks of 128 lanes (V = 200: the second one padded).
    rng = np.random.default_rng(2)
    _check(rng.normal(size=(9, 200)), rng.integers(0, 3, size=(9, 200)).astype(float), 11)


def test_fused_loss_with_the_kernel(monkeypatch):
    # The fused loss on the kernel's path (interpreted) = its XLA path, value and gradient.
    rng = np.random.default_rng(3)
    hs = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(8, 260)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=(2, 16, 12)), jnp.float32)
    wt = jnp.asarray(rng.integers(-2, 2, size=(12, 260)), jnp.float32)  # ties
    mask = jnp.asarray(rng.random((2, 16)) > 0.2, jnp.float32)

    def value_and_grad():
        loss = lambda h, w: fused.fused_tad_loss(h, w, ht, wt, mask, top_k=3, chunk_size=16)
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, ws)

    want = value_and_grad()
    monkeypatch.setattr(core, "_KERNEL_INTERPRET", True)
    calls = []
    kernel = tpu_kernel.head_and_terms
    monkeypatch.setattr(tpu_kernel, "head_and_terms",
                        lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    got = value_and_grad()
    assert calls and all(kw == {"interpret": True} for kw in calls)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding,dtype", [(True, jnp.float32), (False, jnp.float32),
                                           (True, jnp.bfloat16)])
def test_tad_divergence_with_the_kernel(monkeypatch, padding, dtype):
    # `losses.tad_divergence` on float32 or bf16 logits takes the kernel on TPU: = its XLA path.
    from tad_jax import losses

    rng = np.random.default_rng(5)
    s = jnp.asarray(rng.normal(size=(2, 8, 700)), dtype)
    t = jnp.asarray(rng.integers(-3, 3, size=(2, 8, 700)), dtype)
    if padding:
        s = s.at[..., 650:].set(-jnp.inf)
    loss = lambda s: losses.tad_divergence(s, t, top_k=5, student_padding=padding)  # noqa: E731
    want = jax.value_and_grad(loss)(s)
    monkeypatch.setattr(core, "_KERNEL_INTERPRET", True)
    calls = []
    kernel = tpu_kernel.head_and_terms
    monkeypatch.setattr(tpu_kernel, "head_and_terms",
                        lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    got = jax.value_and_grad(loss)(s)
    assert calls
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not targets.has_module("libtpu"), reason="libtpu is needed for a TPU compile")
def test_tpu_compile_of_fused_tad_uses_the_kernel(monkeypatch):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu
    rep = one_device("v5p:2x2x1")
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=rep)  # noqa: E731
    loss = lambda hs, ws, ht, wt: fused.fused_tad_loss(hs, ws, ht, wt, top_k=10, chunk_size=256)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        sds(2, 256, 64), sds(64, 2048), sds(2, 256, 96), sds(96, 2048)).compile().as_text()
    assert 'custom_call_target="tpu_custom_call"' in hlo
    assert "TopK" not in hlo  # the kernel replaced XLA's TopK
    # The benchmarks' count of its HBM bytes (XLA counts none): a and b of one chunk (the scan
    # body, counted once as by XLA) read once, three [256, 128] results written once.
    assert _bench_loss().pallas_bytes(hlo) == 2 * 256 * 2048 * 4 + 3 * 256 * 128 * 4


@pytest.mark.skipif(not targets.has_module("libtpu"), reason="libtpu is needed for a TPU compile")
def test_tpu_compile_of_tad_divergence_at_temperature_one(monkeypatch):
    from tad_jax import losses

    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    rep = one_device("v5p:2x2x1")
    # (V = 300: short next to K, where off TPU `lax.top_k` takes the head.)
    for dtype, tau, vocab, kernel in ((jnp.float32, 1.0, 4096, True),
                                      (jnp.bfloat16, 1.0, 4096, True),
                                      (jnp.bfloat16, 1.0, 300, True),
                                      (jnp.float32, 2.0, 4096, False)):
        grad = jax.jit(jax.grad(functools.partial(losses.tad_divergence, top_k=10,
                                                  temperature=tau)))
        x = jax.ShapeDtypeStruct((1, 64, vocab), dtype, sharding=rep)
        hlo = grad.lower(x, x).compile().as_text()
        # τ != 1 keeps TopK: the kernel would need tempered copies written out (and an in-VMEM
        # division need not round as XLA's, which the gradient's tail test repeats).
        assert ('custom_call_target="tpu_custom_call"' in hlo) == kernel, (dtype, tau, vocab)
        assert ("TopK" in hlo) != kernel, (dtype, tau, vocab)
    # float32 with the student's padding merged (the default): in VMEM, so no merged copy of
    # the teacher is written for the kernel. Here TAD moves 5.5 f32 [N, V] tensors' worth, KL
    # 15.0 (16.5 with the copy; at the benchmark's shapes 5.1, KL 7.0, 8.1 with the copy).
    bench = _bench_loss()
    x = jax.ShapeDtypeStruct((1, 256, 4096), jnp.float32)
    cost = {name: bench.tpu_aot_cost(jax.grad(f), [x, x])["bytes"] / (256 * 4096 * 4)
            for name, f in (("tad", losses.tad_divergence), ("kl", losses.kl_divergence))}
    assert cost["tad"] < 6.0 and cost["tad"] < cost["kl"], cost


@pytest.mark.skipif(not targets.has_module("libtpu"), reason="libtpu is needed for a TPU compile")
def test_tpu_compile_over_several_devices(monkeypatch):
    # A Mosaic kernel cannot be partitioned by XLA: over 4 devices with rows sharded and no
    # mesh in context, the program lowers XLA's path (TopK) instead of failing.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    mesh = jax.sharding.Mesh(targets.resolve_target("v5p:2x2x1").devices[:4], ("data",))
    shard = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))  # noqa: E731
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=shard(*spec)) for shape, spec in (
        ((8, 256, 64), ("data",)), ((64, 2048), ()), ((8, 256, 96), ("data",)), ((96, 2048), ()))]
    loss = lambda hs, ws, ht, wt: fused.fused_tad_loss(hs, ws, ht, wt, top_k=10, chunk_size=2048)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    assert "TopK" in hlo and "tpu_custom_call" not in hlo
    # With the mesh in context (as in training) the kernel runs per device, on its rows.
    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    assert "TopK" not in hlo and 'custom_call_target="tpu_custom_call"' in hlo


def _bench_loss():
    spec = importlib.util.spec_from_file_location(
        "bench_loss", pathlib.Path(__file__).parents[1] / "scripts" / "bench_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not targets.has_module("libtpu"), reason="libtpu is needed for a TPU compile")
def test_vmem_of_the_chip_compiled_for_decides(monkeypatch):
    # Rows of V = 160000 need 21.5 MiB of VMEM: a v5p core has 64 MiB, a v4 core 16 (pltpu's
    # table), so v4 takes XLA's TopK instead of failing to compile; V = 4096 fits both.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    for topology, vocab, kernel in (("v5p:2x2x1", 160000, True), ("v4:2x2x1", 160000, False),
                                    ("v4:2x2x1", 4096, True)):
        rep = one_device(topology)
        x = jax.ShapeDtypeStruct((8, vocab), jnp.float32, sharding=rep)
        terms = jax.jit(lambda a, b: core.head_and_terms(a, b, 10)[1])
        hlo = terms.lower(x, x).compile().as_text()
        assert ('custom_call_target="tpu_custom_call"' in hlo) == kernel, (topology, vocab)
        assert ("TopK" in hlo) != kernel, (topology, vocab)


@pytest.mark.skipif(not targets.has_module("libtpu"), reason="libtpu is needed for a TPU compile")
def test_largest_k_compiles_with_the_kernel(monkeypatch):
    # K up to 32 takes the kernel and fits v5p's VMEM at V = 256000 (its final selection holds
    # (K+1)² [8, 128] temporaries: K = 60 ran out); K = 33 takes XLA's TopK.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    rep = one_device("v5p:2x2x1")
    x = jax.ShapeDtypeStruct((8, 256000), jnp.float32, sharding=rep)
    for k, kernel in ((32, True), (33, False)):
        terms = jax.jit(lambda a, b, k=k: core.head_and_terms(a, b, k)[1])
        hlo = terms.lower(x, x).compile().as_text()
        assert ('custom_call_target="tpu_custom_call"' in hlo) == kernel, k
