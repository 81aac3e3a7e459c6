"""Attention implementations (tad_jax.models.attention) against the plain XLA path.

Splash runs in Pallas interpret mode on CPU (T=256: the kernel tiles by 128). Every comparison is
on real tokens (segment id != 0): padding outputs are never read and differ by design.
Gradients are compared leaf by leaf relative to the leaf's largest entry (float32 roundoff).
"""

from __future__ import annotations

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tad_jax import sharding
from tad_jax.models import Decoder, ModelConfig, init_params, resolve_attention
from tad_jax.models import attention as attn

T = 256
V = 64
_BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16)
# One tiny config per family; windows (48) are smaller than T and than the documents.
FAMILIES = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, sliding_window=48,
                  layer_types=("full_attention", "sliding_attention")),
    "gemma2": dict(model_type="gemma2", hidden_act="gelu_pytorch_tanh", sliding_window=48,
                   layer_types=("sliding_attention", "full_attention"), attn_logit_softcap=5.0,
                   final_logit_softcap=30.0, query_pre_attn_scalar=24.0),
    "phi": dict(model_type="phi", num_kv_heads=4, hidden_act="gelu_new", qkv_bias=True,
                o_bias=True, mlp_bias=True, lm_head_bias=True, partial_rotary_factor=0.5),
    "phi3": dict(model_type="phi3", num_kv_heads=4),
}


def _config(family: str, **kw) -> ModelConfig:
    return ModelConfig(**{**_BASE, **FAMILIES[family], **kw})


def _packed_segments() -> np.ndarray:
    """Row 0: three documents; row 1: three documents then padding (segment 0)."""
    seg = np.zeros((2, T), np.int32)
    for row, lengths in enumerate([(70, 100, 86), (60, 80, 76)]):
        start = 0
        for i, n in enumerate(lengths):
            seg[row, start:start + n] = i + 1
            start += n
    return seg


SEG = _packed_segments()
REAL = SEG != 0


def _assert_grads_close(got, want, rel=1e-5):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                            jax.tree_util.tree_leaves(want), strict=True):
        scale = max(float(np.abs(w).max()), 1e-30)
        err = float(np.abs(np.asarray(g) - np.asarray(w)).max())
        assert err <= rel * scale, f"{jax.tree_util.keystr(path)}: {err} > {rel} * {scale}"


def _decoder_loss_and_grads(cfg: ModelConfig, params, ids, seg):
    def loss(p):
        logits = Decoder(cfg).apply({"params": p}, ids, seg).logits
        return jnp.sum(jnp.where(jnp.asarray(seg != 0)[..., None], jnp.sin(logits), 0.0)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@functools.cache
def _xla_reference(family: str):
    """(config, params, ids, logits, grads) of the family's tiny decoder on the XLA path."""
    cfg = _config(family)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, V, (2, T)))
    params = jax.jit(lambda r: init_params(Decoder(cfg), r))(jax.random.key(0))
    return cfg, params, ids, *_decoder_loss_and_grads(cfg.replace(attention="xla"), params,
                                                      ids, SEG)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_matches_xla(family, impl):
    """Logits and every parameter gradient of a 2-layer decoder equal the XLA path's on a packed
    batch (3 documents per row, padding), with windows < T and Gemma2's soft-cap/scalar."""
    cfg, params, ids, want_logits, want_grads = _xla_reference(family)
    other = cfg.replace(attention=impl, attn_query_chunk=64 if impl == "chunked" else None)
    got_logits, got_grads = _decoder_loss_and_grads(other, params, ids, SEG)
    np.testing.assert_allclose(np.asarray(got_logits)[REAL], np.asarray(want_logits)[REAL],
                               atol=1e-5, rtol=1e-5)
    _assert_grads_close(got_grads, want_grads)


def _qkv(b=2, t=T, h=4, k=2, e=16, seed=0):
    rs = np.random.RandomState(seed)
    return tuple(jnp.asarray(rs.randn(b, t, n, e), jnp.float32) for n in (h, k, k))


def _xla_attention(cfg, q, k, v, seg, sliding):
    masks = attn.attention_masks(cfg, jnp.asarray(seg), "xla")
    return attn.attend("xla", cfg, q, k, v, masks, sliding, jnp.float32)


def _check_against_xla(fn, cfg, q, k, v, seg, sliding):
    """Values and gradients (w.r.t. q, k, v) of fn(q, k, v) equal the XLA path's."""
    real = jnp.asarray(seg != 0)[..., None, None]
    weights = jnp.asarray(np.random.RandomState(7).randn(*q.shape), jnp.float32)

    def loss(f):
        return lambda *qkv: jnp.sum(jnp.where(real, f(*qkv) * weights, 0.0))

    ref = lambda q_, k_, v_: _xla_attention(cfg, q_, k_, v_, seg, sliding)
    got, want = jax.jit(fn)(q, k, v), jax.jit(ref)(q, k, v)
    np.testing.assert_allclose(np.asarray(got)[seg != 0], np.asarray(want)[seg != 0],
                               atol=1e-5, rtol=1e-5)
    g_got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    g_want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    _assert_grads_close(g_got, g_want)


@pytest.mark.parametrize("family,sliding", [("llama", False), ("qwen2", True),
                                            ("gemma2", True), ("phi3", False)])
def test_cudnn_call_is_well_formed(family, sliding):
    """The cuDNN call (causal, window, GQA unrepeated, segment mask, scale) run through
    `jax.nn.dot_product_attention`'s XLA implementation equals our XLA path. Gemma2's soft-cap
    is not passed to cuDNN (auto never picks it there), so it is checked without the cap."""
    cfg = _config(family, attn_logit_softcap=None)
    q, k, v = _qkv(k=cfg.num_kv_heads)
    window = cfg.sliding_window if sliding else None
    fn = lambda q_, k_, v_: attn._cudnn(cfg, q_, k_, v_, jnp.asarray(SEG), window=window,
                                        dtype=jnp.float32, implementation="xla")
    _check_against_xla(fn, cfg, q, k, v, SEG, sliding)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN flash attention needs an NVIDIA GPU; this host has none")
def test_cudnn_numerics_on_gpu():  # pragma: no cover - runs only where a GPU is present
    cfg = _config("qwen2")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(k=cfg.num_kv_heads))
    got = attn._cudnn(cfg, q, k, v, jnp.asarray(SEG), window=48, dtype=jnp.bfloat16)
    want = _xla_attention(cfg, q, k, v, SEG, True)
    np.testing.assert_allclose(np.asarray(got, np.float32)[REAL],
                               np.asarray(want, np.float32)[REAL], atol=2e-2, rtol=2e-2)


def test_splash_sharded_over_a_mesh_with_repeated_kv_heads():
    """Under a (data 2, fsdp 2, tensor 2) mesh of CPU devices the shard_map'd kernel equals the
    XLA path, with one KV head (repeated twice so it splits over `tensor`) and a window."""
    cfg = _config("qwen2", num_kv_heads=1)
    q, k, v = _qkv(b=4, k=1, seed=3)
    seg = np.concatenate([SEG, SEG[::-1]])
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    fn = lambda q_, k_, v_: attn.attend("splash", cfg, q_, k_, v_,
                                        attn.attention_masks(cfg, jnp.asarray(seg), "splash"),
                                        True, jnp.float32)
    import flax.linen as nn

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        hlo = jax.jit(fn).lower(q, k, v).as_text()
        assert "shard_map" in hlo or "manual" in hlo.lower()
        _check_against_xla(fn, cfg, q, k, v, seg, True)


def test_scan_layers_switch_windows_inside_splash():
    """Scanned layers pass a traced sliding flag: the splash kernels switch with lax.cond and
    still equal the unrolled XLA model."""
    cfg, params, ids, want, _ = _xla_reference("gemma2")
    stacked = {k: v for k, v in params.items() if not k.startswith("layer_")}
    stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), params["layer_0"],
                                     params["layer_1"])
    scfg = cfg.replace(attention="splash", scan_layers=True)
    got = jax.jit(Decoder(scfg).apply)({"params": stacked}, ids, SEG).logits
    np.testing.assert_allclose(np.asarray(got)[REAL], np.asarray(want)[REAL], atol=1e-5,
                               rtol=1e-5)


# ---- choosing the implementation ------------------------------------------------------------


def test_auto_resolves_by_platform_and_features(caplog):
    llama, gemma = _config("llama"), _config("gemma2")
    assert resolve_attention(llama, "tpu", seq_len=2048) == ("splash", "")
    assert resolve_attention(gemma, "tpu", seq_len=2048) == ("splash", "")  # soft-cap is fine
    assert resolve_attention(llama, "cuda", seq_len=2048, dtype=jnp.bfloat16).impl == "cudnn"
    assert resolve_attention(llama, "cpu", seq_len=2048).impl == "xla"
    assert resolve_attention(llama.replace(attn_query_chunk=512), "cpu").impl == "chunked"
    attn._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=attn.__name__):
        for _ in range(3):  # logged once
            choice = resolve_attention(gemma, "gpu", seq_len=2048, dtype=jnp.bfloat16)
    assert choice.impl == "xla" and "soft-cap" in choice.reason
    assert [r.getMessage() for r in caplog.records].count(
        "attention='auto' on gpu uses 'xla' for gemma2: " + choice.reason + ".") == 1
    f32 = resolve_attention(llama, "gpu", seq_len=2048, dtype=jnp.float32)
    assert f32.impl == "xla" and "bfloat16" in f32.reason
    big_head = resolve_attention(llama.replace(head_dim=512), "gpu", dtype=jnp.bfloat16)
    assert big_head.impl == "xla" and "head_dim" in big_head.reason


def test_splash_falls_back_on_shapes_it_cannot_tile():
    cfg = _config("llama", attention="splash")
    assert resolve_attention(cfg, "tpu", seq_len=8).impl == "xla"  # init's dummy batch
    assert resolve_attention(cfg.replace(attn_query_chunk=64), "tpu", seq_len=200).impl == (
        "chunked")
    assert resolve_attention(cfg.replace(attn_block_size=512), "tpu", seq_len=384).impl == "xla"
    assert resolve_attention(cfg, "cpu", seq_len=256).impl == "splash"  # interpret mode
    assert attn.splash_block_size(cfg, 2048) == 512
    assert attn.splash_block_size(cfg, 384) == 128
    assert attn.splash_block_size(cfg.replace(attn_block_size=256), 2048) == 256


def test_explicit_choices_and_bad_values():
    with pytest.raises(ValueError, match="GPU only"):
        resolve_attention(_config("llama", attention="cudnn"), "cpu")
    with pytest.raises(ValueError, match="soft-cap"):
        resolve_attention(_config("gemma2", attention="cudnn"), "gpu", dtype=jnp.bfloat16)
    assert resolve_attention(_config("llama", attention="xla"), "tpu").impl == "xla"
    with pytest.raises(ValueError, match="attention='flash'"):
        _config("llama", attention="flash")
    with pytest.raises(ValueError, match="attn_query_chunk"):
        _config("llama", attention="chunked")
    with pytest.raises(ValueError, match="multiple of 128"):
        _config("llama", attn_block_size=100)


def test_decoder_resolves_by_the_mesh_in_context(monkeypatch):
    """The decoder asks the mesh in context for the platform: with a GPU target and bfloat16,
    'auto' dispatches to cuDNN (here spied and run through XLA)."""
    calls, cudnn = [], attn._cudnn

    def spy(*args, **kw):
        calls.append(kw["window"])
        return cudnn(*args, **kw, implementation="xla")

    monkeypatch.setattr(attn, "_cudnn", spy)
    monkeypatch.setattr(attn, "target_platform", lambda: "gpu")
    cfg = _config("qwen2")
    model = Decoder(cfg, dtype=jnp.bfloat16)
    params = init_params(model, jax.random.key(0), abstract=True)
    calls.clear()
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 8), jnp.int32)), params)
    assert calls == [None, 48]  # layer 0 full, layer 1 sliding


# ---- TPU compile (ahead of time, on this CPU host) -------------------------------------------


def _tpu_mesh(monkeypatch, data, fsdp, tensor):
    pytest.importorskip("libtpu", reason="libtpu is needed to compile for a TPU topology")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    return sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), devices)


@pytest.mark.slow
def test_splash_decoder_compiles_for_a_tpu_topology(monkeypatch):
    """'auto' under a v5p:2x2x1 mesh resolves to splash (the target's platform, not this CPU
    host's), and a tiny Gemma2 decoder's forward + backward (soft-cap, window, GQA heads over
    `tensor`, packed segments) compiles with the splash forward, dq and dkv kernels in it."""
    import flax.linen as nn

    mesh = _tpu_mesh(monkeypatch, 1, 2, 2)
    cfg = ModelConfig(**{**_BASE, **FAMILIES["gemma2"], "hidden_size": 256, "head_dim": 128,
                         "vocab_size": 512})
    assert resolve_attention(cfg, mesh.devices.flat[0].platform, seq_len=T).impl == "splash"
    model = Decoder(cfg, dtype=jnp.bfloat16)
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                           jax.random.key(0))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          sharding.unbox(boxed), sharding.param_shardings(boxed, mesh))
    batch = jax.ShapeDtypeStruct((4, T), jnp.int32, sharding=sharding.batch_sharding(mesh))

    def loss(p, ids, seg):
        return jnp.mean(model.apply({"params": p}, ids, seg).logits)

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        hlo = jax.jit(jax.grad(loss)).lower(params, batch, batch).compile().as_text()
    kernels = set(re.findall(r"splash_mha_(fwd|dq|dkv)_segmented", hlo))
    assert kernels == {"fwd", "dq", "dkv"}
