"""init_student: copied tensors are the teacher's slices, MLPs are new, the frozen mask is right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from tad_jax.models import Decoder, ModelConfig, init_student
from tad_jax.models.student import default_layer_indices

V = 128


def _teacher(model_type="llama", **kw):
    base = dict(model_type=model_type, vocab_size=V, hidden_size=32, intermediate_size=48,
                num_layers=6, num_heads=4, num_kv_heads=2, head_dim=8)
    cfg = ModelConfig(**{**base, **kw})
    params = Decoder(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    # Non-trivial norms so a copied norm is distinguishable from a fresh one.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 if "norm" in jax.tree_util.keystr(p) else x, meta.unbox(params))
    return cfg, params


def test_default_layers_evenly_spaced():
    assert default_layer_indices(24, 12) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
    assert default_layer_indices(6, 3) == [0, 2, 5]
    assert default_layer_indices(6, 6) == list(range(6))


def test_same_dims_copies_attention_exactly_and_reinitialises_mlp():
    t_cfg, t_params = _teacher()
    s_cfg, s_params, mask = init_student(t_cfg, t_params, {"num_layers": 3,
                                                           "intermediate_size": 40},
                                         jax.random.PRNGKey(1))
    assert s_cfg.num_layers == 3 and s_cfg.intermediate_size == 40
    assert s_cfg.hidden_size == t_cfg.hidden_size
    np.testing.assert_array_equal(s_params["embed"]["embedding"], t_params["embed"]["embedding"])
    np.testing.assert_array_equal(s_params["lm_head"]["kernel"], t_params["lm_head"]["kernel"])
    for i, t in enumerate([0, 2, 5]):
        s_layer, t_layer = s_params[f"layer_{i}"], t_params[f"layer_{t}"]
        for name in "qkvo":
            np.testing.assert_array_equal(s_layer["attn"][name]["kernel"],
                                          t_layer["attn"][name]["kernel"])
        np.testing.assert_array_equal(s_layer["attn_norm"]["scale"], t_layer["attn_norm"]["scale"])
        assert s_layer["mlp"]["up"]["kernel"].shape == (32, 40)
        assert not np.allclose(s_layer["mlp"]["down"]["kernel"],
                               t_layer["mlp"]["down"]["kernel"][:40])
    assert mask["embed"]["embedding"] is False and mask["lm_head"]["kernel"] is False
    assert mask["layer_0"]["attn"]["q"]["kernel"] is True
    assert mask["layer_2"]["mlp"]["gate"]["kernel"] is True
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(s_params)
    logits = Decoder(s_cfg).apply({"params": s_params}, jnp.arange(10)[None] % V).logits
    assert logits.shape == (1, 10, V) and bool(jnp.all(jnp.isfinite(logits)))


def test_smaller_heads_are_teacher_slices_with_rope_pairs_kept():
    t_cfg, t_params = _teacher("qwen2", qkv_bias=True)
    s_cfg, s_params, _ = init_student(
        t_cfg, t_params, {"num_layers": 2, "layer_indices": [1, 4], "hidden_size": 24,
                          "num_heads": 3, "num_kv_heads": 1, "head_dim": 4},
        jax.random.PRNGKey(2))
    qk = np.array([0, 1, 4, 5])  # first 2 of each rotated half of the teacher's 8 channels
    t_attn, s_attn = t_params["layer_4"]["attn"], s_params["layer_1"]["attn"]
    np.testing.assert_array_equal(s_attn["q"]["kernel"],
                                  np.asarray(t_attn["q"]["kernel"])[:24, :3][:, :, qk])
    np.testing.assert_array_equal(s_attn["k"]["bias"], np.asarray(t_attn["k"]["bias"])[:1][:, qk])
    np.testing.assert_array_equal(s_attn["v"]["kernel"],
                                  np.asarray(t_attn["v"]["kernel"])[:24, :1, :4])
    np.testing.assert_array_equal(s_attn["o"]["kernel"],
                                  np.asarray(t_attn["o"]["kernel"])[:3, :4, :24])
    np.testing.assert_array_equal(s_params["embed"]["embedding"],
                                  np.asarray(t_params["embed"]["embedding"])[:, :24])
    out = Decoder(s_cfg).apply({"params": s_params}, jnp.arange(8)[None])
    assert bool(jnp.all(jnp.isfinite(out.logits)))


def test_fewer_query_heads_keep_their_teacher_kv_pairing():
    """Teacher: 4 query heads over 2 KV heads (pairs 0,1→kv0 and 2,3→kv1). A student with 2 query
    heads over the same 2 KV heads must take teacher heads 0 and 2, not 0 and 1 (head 1 would read
    kv1's slot in the student while it was trained against kv0)."""
    t_cfg, t_params = _teacher("qwen2", qkv_bias=True)
    _, s_params, _ = init_student(t_cfg, t_params, {"num_layers": 1, "layer_indices": [3],
                                                    "num_heads": 2, "head_dim": 8},
                                  jax.random.PRNGKey(4))
    t_attn, s_attn = t_params["layer_3"]["attn"], s_params["layer_0"]["attn"]
    for name in ("q", "o"):
        np.testing.assert_array_equal(s_attn[name]["kernel"],
                                      np.asarray(t_attn[name]["kernel"])[[0, 2]] if name == "o"
                                      else np.asarray(t_attn[name]["kernel"])[:, [0, 2]])
    np.testing.assert_array_equal(s_attn["q"]["bias"], np.asarray(t_attn["q"]["bias"])[[0, 2]])
    np.testing.assert_array_equal(s_attn["k"]["kernel"], t_attn["k"]["kernel"])


def test_tied_gemma_scanned_student_and_unfrozen_embeddings():
    t_cfg, t_params = _teacher("gemma2", tie_word_embeddings=True, sliding_window=4,
                               layer_types=("sliding_attention", "full_attention") * 3,
                               final_logit_softcap=30.0, attn_logit_softcap=50.0,
                               query_pre_attn_scalar=8)
    s_cfg, s_params, mask = init_student(
        t_cfg, t_params, {"num_layers": 2, "scan_layers": True, "freeze_embeddings": False},
        jax.random.PRNGKey(3))
    assert "lm_head" not in s_params and mask["embed"]["embedding"] is True
    assert s_cfg.layer_types == ("sliding_attention", "full_attention")  # teacher layers 0 and 5
    np.testing.assert_array_equal(s_params["layers"]["attn"]["q"]["kernel"][1],
                                  t_params["layer_5"]["attn"]["q"]["kernel"])
    logits = Decoder(s_cfg).apply({"params": s_params}, jnp.arange(9)[None]).logits
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("overrides, match", [
    ({"num_layers": 7}, "between 1 and the teacher's 6"),
    ({"num_layers": 2, "layer_indices": [0, 6]}, "layer_indices"),
    ({"num_layers": 2, "layer_indices": [0]}, "layer_indices"),
    ({"hidden_size": 30, "num_heads": 4}, "not divisible by num_heads"),
    ({"hidden_size": 64, "head_dim": 16, "num_heads": 4}, "exceeds the teacher"),
    ({"num_heads": 3, "num_kv_heads": 2, "head_dim": 8}, "not a multiple of"),
])
def test_bad_overrides_raise_with_the_fix(overrides, match):
    t_cfg, t_params = _teacher()
    with pytest.raises(ValueError, match=match):
        init_student(t_cfg, t_params, overrides, jax.random.PRNGKey(0))
