"""HF conversion: config translation and the errors on bad input (no torch needed here)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from safetensors.numpy import load_file, save_file

from tad_jax.models import PRESETS, Decoder, ModelConfig, from_pretrained, save_pretrained
from tad_jax.models.convert import TABLES, expand_rules

TINY = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
            num_heads=2, num_kv_heads=1, head_dim=8)


@pytest.fixture()
def saved(tmp_path):
    cfg = ModelConfig(**TINY)
    model = Decoder(cfg)
    params = meta.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 3), jnp.int32)))["params"]
    save_pretrained(model, params, tmp_path)
    return tmp_path, model, params


def test_roundtrip_through_files_is_exact(saved):
    path, _, params = saved
    _, loaded = from_pretrained(path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_every_table_covers_every_param():
    """Each family's table maps exactly the parameters the decoder creates (no more, no less)."""
    for name, cfg in PRESETS.items():
        small = cfg.replace(vocab_size=64, hidden_size=32, intermediate_size=16, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=10, layer_types=None,
                            sliding_window=None, rope_scaling=None)
        shapes = jax.eval_shape(Decoder(small).init, jax.random.PRNGKey(0),
                                jnp.ones((1, 1), jnp.int32))
        flat = jax.tree_util.tree_flatten_with_path(meta.unbox(shapes["params"]))[0]
        created = {"/".join(k.key for k in path) for path, _ in flat}
        mapped = [p for rule in expand_rules(small) for p in rule.flax]
        assert sorted(mapped) == sorted(created), name
    assert set(TABLES) == {"llama", "qwen2", "gemma2", "phi", "phi3"}


def test_legacy_and_v5_rope_keys_agree():
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
    base = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24,
                num_hidden_layers=2, num_attention_heads=2)
    legacy = ModelConfig.from_hf(base | dict(rope_theta=5e5, rope_scaling=dict(
        scaling, type="llama3")))
    v5 = ModelConfig.from_hf(base | dict(rope_parameters=dict(scaling, rope_type="llama3",
                                                              rope_theta=5e5)))
    assert legacy == v5 and v5.rope_theta == 5e5 and v5.rope_scaling_dict["factor"] == 8.0
    assert v5.num_kv_heads == 2 and v5.head_dim == 8


def test_unsupported_model_type_lists_the_supported(tmp_path):
    with pytest.raises(ValueError, match=r"supports \['llama', 'qwen2', 'gemma2', 'phi', 'phi3'\]"):
        ModelConfig.from_hf(dict(model_type="gpt2", vocab_size=10))
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="mistral")))
    with pytest.raises(ValueError, match="Unsupported model_type 'mistral'"):
        from_pretrained(tmp_path)


def test_loading_only_the_first_layers(saved):
    """num_layers=1 loads layer 0 only (dry runs of big teachers); more than stored is refused."""
    path, model, params = saved
    small, loaded = from_pretrained(path, num_layers=1)
    assert small.config.num_layers == 1 and "layer_1" not in loaded
    np.testing.assert_array_equal(loaded["layer_0"]["attn"]["q"]["kernel"],
                                  params["layer_0"]["attn"]["q"]["kernel"])
    with pytest.raises(ValueError, match="between 1 and the checkpoint's 2"):
        from_pretrained(path, num_layers=3)


def test_unknown_override_is_named(saved):
    path, _, _ = saved
    with pytest.raises(ValueError, match=r"Unknown ModelConfig fields \['scan'\]"):
        from_pretrained(path, scan=True)


def test_unsupported_rope_type():
    hf = dict(ModelConfig(**TINY).to_hf(), rope_scaling=dict(rope_type="yarn", factor=4.0))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_hf(hf)


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "nowhere")
    path, model, params = saved
    (path / "model.safetensors").rename(path / "elsewhere.bin")
    with pytest.raises(FileNotFoundError, match="No model.safetensors.*safe_serialization"):
        from_pretrained(path)


def test_missing_shard(tmp_path, saved):
    _, model, params = saved
    save_pretrained(model, params, tmp_path / "sharded", max_shard_bytes=2_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match="shard files that are missing"):
        from_pretrained(tmp_path / "sharded")


def test_partial_checkpoint(saved):
    path, _, _ = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*layers\.1\.mlp\.up_proj"):
        from_pretrained(path)


def test_shape_disagrees_with_config(saved):
    path, _, _ = saved
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(hf | {"intermediate_size": 32}))
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \(24, 16\).*\(32, 16\)"):
        from_pretrained(path)


def test_config_with_fewer_layers_than_the_weights(saved):
    path, _, _ = saved
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(hf | {"num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="tensors the config does not use"):
        from_pretrained(path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_from_hf_roundtrip(name):
    cfg = PRESETS[name].replace(remat=True)
    assert ModelConfig.from_hf(cfg.to_hf(), remat=True) == cfg


def test_loading_and_student_inside_a_mesh_and_rules_context(saved):
    """The training loop keeps a mesh and logical rules in scope: loading must not trip on them."""
    import flax.linen as nn
    from jax.sharding import Mesh

    from tad_jax.models import init_student, lm_head

    path, model, params = saved
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = (("batch", "data"), ("mlp", "model"), ("vocab", "model"), ("heads", "model"))
    boxed = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3), jnp.int32))["params"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, loaded = from_pretrained(path)
        _, s_params, _ = init_student(model.config, loaded, {"num_layers": 1},
                                      jax.random.PRNGKey(1))
        w_dv, _ = lm_head(model.config, boxed)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    assert w_dv.shape == (16, 64) and s_params["layer_0"]["attn"]["q"]["kernel"].shape == (16, 2, 8)
