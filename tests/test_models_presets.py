"""Full-size presets: eval_shape parameter counts equal transformers' (built on torch meta)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from tad_jax.models import PRESETS, STUDENT_OVERRIDES, Decoder, ModelConfig, student_preset
from tad_jax.models.presets import non_embedding_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _flax_count(config: ModelConfig) -> int:
    shapes = jax.eval_shape(Decoder(config).init, jax.random.PRNGKey(0),
                            jnp.ones((1, 1), jnp.int32))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(meta.unbox(shapes)))


def _torch_count(config: ModelConfig) -> int:
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_transformers(name):
    config = PRESETS[name]
    count = _flax_count(config)
    assert count == _torch_count(config)
    assert count == config.num_params()
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_known_sizes():
    """Published totals (rounded as the model cards do) and the paper's ~1B-active students."""
    billions = {name: PRESETS[name].num_params() / 1e9 for name in PRESETS}
    assert round(billions["gemma2-9b"], 1) == 9.2 and round(billions["phi-2"], 1) == 2.8
    assert round(billions["llama2-7b"], 2) == 6.74 and round(billions["tinyllama-1.1b"], 1) == 1.1
    assert round(billions["smollm2-135m"] * 1e3) == 135
    active = {name: non_embedding_params(student_preset(name)) / 1e6 for name in STUDENT_OVERRIDES}
    assert 470 <= active["qwen1.5-1.8b-student-0.5b"] <= 480
    for name in ("qwen1.5-1.8b-student-1.2b", "phi-2-student", "qwen2.5-3b-student"):
        assert 980 <= active[name] <= 1030, (name, active[name])
    assert 1050 <= active["gemma2-9b-student"] <= 1150


@pytest.mark.parametrize("name", sorted(STUDENT_OVERRIDES))
def test_student_presets_count_matches_transformers(name):
    config = student_preset(name)
    assert _flax_count(config) == _torch_count(config) == config.num_params()
