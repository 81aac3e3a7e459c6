"""Parity of tad_jax.models with transformers' PyTorch forward, per family, and the HF round trip.

Every model is a tiny random transformers model built from a config, saved with `save_pretrained`
into tmp_path, loaded with our `from_pretrained`; logits must be within 1e-4 (float32) of
transformers' on full rows, padded rows and two packed documents (each compared with transformers
run on that document alone). Then our `save_pretrained` output is loaded back by transformers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tad_jax.models import Decoder, ModelConfig, from_pretrained, lm_head, save_pretrained  # noqa: E402
from tad_jax.models.decoder import head_logits  # noqa: E402

ATOL = 1e-4
V, T = 256, 12
_COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128)
_LONGROPE = dict(rope_type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
                 long_factor=[1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0])

VARIANTS = {
    "llama_untied_llama3rope": ("LlamaConfig", dict(
        _COMMON, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_tied": ("LlamaConfig", dict(_COMMON, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2_window5_from_layer1": ("Qwen2Config", dict(
        _COMMON, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6,
        use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma2_window4": ("Gemma2Config", dict(
        _COMMON, num_hidden_layers=3, num_key_value_heads=2, head_dim=24, sliding_window=4,
        query_pre_attn_scalar=20, final_logit_softcapping=10.0, attn_logit_softcapping=2.0)),
    "phi": ("PhiConfig", dict(_COMMON, partial_rotary_factor=0.4)),
    "phi3_longrope": ("Phi3Config", dict(
        _COMMON, num_key_value_heads=2, max_position_embeddings=64,
        original_max_position_embeddings=8, rope_scaling=_LONGROPE, pad_token_id=0)),
}


def _hf_model(name, path):
    cls_name, kwargs = VARIANTS[name]
    cfg = getattr(transformers, cls_name)(**kwargs)
    if name.startswith("gemma2"):
        cfg._attn_implementation = "eager"  # the implementation HF recommends for soft-capping
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # HF's init (std 0.02, unit norms) makes attention nearly uniform and soft-caps inactive, which
    # would hide bugs there: use weights large enough for O(1) scores and logits.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif "embed" in pname:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    return model


def _torch_logits(model, ids, **kw):
    kw = {k: torch.tensor(np.asarray(v)) for k, v in kw.items()}
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = _hf_model(request.param, path / "hf")
    model, params = from_pretrained(path / "hf")
    return request.param, hf, model, params, path


def test_forward_matches_transformers(pair):
    """Full rows, a right-padded row and a row of two packed documents, in one batch."""
    _, hf, model, params, _ = pair
    rng = np.random.RandomState(0)
    ids = rng.randint(0, V, (3, T))
    n_valid, split = 7, 5
    seg = np.ones((3, T), np.int32)
    seg[1, n_valid:] = 0
    seg[2, split:] = 2
    out = jax.jit(model.apply, static_argnames="output_hidden_states")(
        {"params": params}, jnp.asarray(ids), jnp.asarray(seg), output_hidden_states=True)
    ours = np.asarray(out.logits)
    assert out.logits.dtype == jnp.float32 and ours.shape == (3, T, V)
    np.testing.assert_allclose(ours[0], _torch_logits(hf, ids[:1])[0], atol=ATOL, rtol=0)
    with torch.no_grad():  # every hidden state, as transformers' output_hidden_states
        ref_hidden = hf(torch.tensor(ids[:1]), output_hidden_states=True).hidden_states
    for a, b in zip(out.all_hidden_states, ref_hidden, strict=True):
        np.testing.assert_allclose(np.asarray(a[0]), b[0].numpy(), atol=ATOL, rtol=0)
    # Padding positions restart at 0 like a new segment (Phi-3's LongRoPE picks its factors from
    # the longest position, so pass the same positions to transformers).
    mask = (seg[1:2] > 0).astype(np.int64)
    pos = np.concatenate([np.arange(n_valid), np.arange(T - n_valid)])[None]
    ref_pad = _torch_logits(hf, ids[1:2], attention_mask=mask, position_ids=pos)[0]
    np.testing.assert_allclose(ours[1, :n_valid], ref_pad[:n_valid], atol=ATOL, rtol=0)
    for lo, hi in ((0, split), (split, T)):
        ref_doc = _torch_logits(hf, ids[2:3, lo:hi])[0]
        np.testing.assert_allclose(ours[2, lo:hi], ref_doc, atol=ATOL, rtol=0)


def test_lm_head_reproduces_logits(pair):
    """The fused loss's view of the head: softcap(hidden @ W + b) equals the model's logits."""
    _, _, model, params, _ = pair
    ids = jnp.asarray(np.random.RandomState(1).randint(0, V, (2, T)))
    out = model.apply({"params": params}, ids, output_hidden_states=True)
    w_dv, b_v = lm_head(model.config, params)
    again = head_logits(model.config, out.hidden_states, w_dv, b_v)
    np.testing.assert_allclose(np.asarray(again), np.asarray(out.logits), atol=1e-5, rtol=0)
    assert len(out.all_hidden_states) == model.config.num_layers + 1
    np.testing.assert_array_equal(out.all_hidden_states[-1], out.hidden_states)
    no_logits = model.apply({"params": params}, ids, return_logits=False)
    assert no_logits.logits is None
    np.testing.assert_allclose(no_logits.hidden_states, out.hidden_states, atol=1e-6, rtol=0)


def test_roundtrip_to_transformers(pair):
    """Ours -> save_pretrained -> transformers: the same tensors and the same logits."""
    _, hf, model, params, path = pair
    save_pretrained(model, params, path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(path / "ours").eval()
    ref_state, back_state = hf.state_dict(), back.state_dict()
    assert set(ref_state) == set(back_state)
    for name, tensor in ref_state.items():
        np.testing.assert_array_equal(back_state[name].numpy(), tensor.numpy(), err_msg=name)
    ids = np.random.RandomState(2).randint(0, V, (2, T))
    np.testing.assert_allclose(_torch_logits(back, ids), _torch_logits(hf, ids), atol=1e-6, rtol=0)
    assert ModelConfig.from_hf(json.loads((path / "ours" / "config.json").read_text())) \
        == model.config


def test_sharded_save_and_bf16_load(pair, tmp_path):
    """Several safetensors shards + index are written and read; dtype casts on load."""
    _, _, model, params, _ = pair
    save_pretrained(model, params, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    model16, params16 = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    leaves = jax.tree_util.tree_leaves(params16)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    ids = jnp.asarray(np.random.RandomState(3).randint(0, V, (1, T)))
    ref = model.apply({"params": params}, ids).logits
    low = model16.apply({"params": params16}, ids).logits
    assert low.dtype == jnp.float32  # logits stay float32 whatever the param dtype
    assert float(jnp.max(jnp.abs(low - ref))) < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_init_is_boxed_with_logical_axes():
    cfg = ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    variables = Decoder(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
    boxed = variables["params"]
    assert boxed["embed"]["embedding"].names == ("vocab", "embed")
    assert boxed["layer_0"]["attn"]["k"]["kernel"].names == ("embed", "kv_heads", "head_dim")
    assert boxed["layer_0"]["mlp"]["down"]["kernel"].names == ("mlp", "embed")
    scanned = Decoder(cfg.replace(scan_layers=True)).init(
        jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    names = scanned["layers"]["attn"]["q"]["kernel"].names
    assert names == ("layers", "embed", "heads", "head_dim")


def _tiny_gemma_config(**kw):
    return ModelConfig(model_type="gemma2", vocab_size=V, hidden_size=32, intermediate_size=48,
                       num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=3,
                       layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                       final_logit_softcap=5.0, attn_logit_softcap=4.0, query_pre_attn_scalar=8,
                       **kw)


def _stack_layers(params, n):
    layers = [params[f"layer_{i}"] for i in range(n)]
    rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
    return rest | {"layers": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}


@pytest.mark.parametrize("switches", [dict(remat=True), dict(scan_layers=True),
                                      dict(scan_layers=True, remat=True),
                                      dict(attn_query_chunk=3, remat=True),
                                      dict(remat=True,
                                           remat_policy="dots_with_no_batch_dims_saveable"),
                                      dict(scan_layers=True, remat=True,
                                           remat_policy="dots_saveable")])
def test_remat_and_scan_match_the_plain_path(switches):
    """Same logits, hidden states and gradients; sliding/global alternation survives the scan;
    query-chunked attention (9 = 3 blocks of 3, packed segments, window 3) is exact."""
    cfg = _tiny_gemma_config()
    plain = meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))
    plain = plain["params"]
    other_cfg = cfg.replace(**switches)
    other = _stack_layers(plain, cfg.num_layers) if other_cfg.scan_layers else plain
    ids = jnp.asarray(np.random.RandomState(4).randint(0, V, (2, 9)))
    seg = jnp.asarray([[1] * 9, [1] * 4 + [2] * 5])

    def loss(model, p):
        out = model.apply({"params": p}, ids, seg, output_hidden_states=True)
        return jnp.sum(jnp.sin(out.logits)), out

    (l0, o0), g0 = jax.value_and_grad(lambda p: loss(Decoder(cfg), p), has_aux=True)(plain)
    (l1, o1), g1 = jax.value_and_grad(lambda p: loss(Decoder(other_cfg), p), has_aux=True)(other)
    np.testing.assert_allclose(o1.logits, o0.logits, atol=1e-5, rtol=0)
    for a, b in zip(o1.all_hidden_states, o0.all_hidden_states, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    g0 = _stack_layers(g0, cfg.num_layers) if other_cfg.scan_layers else g0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                           g1, g0)


def test_scanned_load_and_sharded_placement(tmp_path):
    """from_pretrained(scan_layers=True) and into NamedShardings: the same logits."""
    path = tmp_path
    _hf_model("llama_untied_llama3rope", path / "hf")
    model, params = from_pretrained(path / "hf")
    ids = jnp.asarray(np.random.RandomState(5).randint(0, V, (2, T)))
    ref = model.apply({"params": params}, ids).logits
    scan_model, scan_params = from_pretrained(path / "hf", scan_layers=True, remat=True)
    assert scan_params["layers"]["attn"]["q"]["kernel"].shape[0] == model.config.num_layers
    np.testing.assert_allclose(scan_model.apply({"params": scan_params}, ids).logits, ref,
                               atol=1e-5, rtol=0)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    shardings = jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, PartitionSpec(*([None] * (x.ndim - 1)), "model"))
        if x.shape[-1] % 4 == 0 else NamedSharding(mesh, PartitionSpec()), params)
    _, sharded = from_pretrained(path / "hf", shardings=shardings)
    kernel = sharded["layer_0"]["mlp"]["up"]["kernel"]
    assert kernel.sharding == shardings["layer_0"]["mlp"]["up"]["kernel"]
    np.testing.assert_allclose(model.apply({"params": sharded}, ids).logits, ref, atol=1e-5,
                               rtol=0)
