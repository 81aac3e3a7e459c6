"""Tests of tad_jax.builders: the tokenizer check, a teacher folder cut to fewer layers.
Building the models is exercised by test_step (the tiny models), test_train (teacher and
student from HF folders) and test_dry_run."""

import jax
import numpy as np
import pytest
from tiny_setup import tiny, tiny_config

from tad_jax import run_setup, sharding
from tad_jax.builders import build_teacher, check_tokenizers


def test_different_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, tok_dir = tiny.build_assets()
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(["a completely different corpus " * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=other).save_pretrained(tmp_path / "other")
    check_tokenizers({"teacher": tok_dir, "data": tok_dir}, 512)  # one tokenizer: fine
    with pytest.raises(ValueError, match="teacher and student tokenizers differ"):
        check_tokenizers({"teacher": tok_dir, "student": str(tmp_path / "other")}, 256)


def test_teacher_from_a_folder_with_fewer_layers_loads_only_those(tmp_path):
    """dry_run.num_layers with teacher.path: the params are the first layers of the checkpoint
    (in the model's shardings), not every layer under a smaller model."""
    from tad_jax.models import save_pretrained

    cfg = tiny_config(**{"mesh.num_devices": 2})
    full_model, full_params = build_teacher(cfg)
    save_pretrained(full_model, full_params, tmp_path / "teacher")
    cfg = tiny_config(**{"mesh.num_devices": 2, "teacher.path": str(tmp_path / "teacher"),
                         "teacher.random_init": False, "dry_run.num_layers": 1})
    with cfg.unlocked():
        cfg.teacher.model = {}
    mesh = sharding.make_mesh(cfg.mesh)
    with run_setup.mesh_context(mesh):
        model, params = build_teacher(cfg, mesh)
    assert model.config.num_layers == 1
    assert sorted(params) == ["embed", "final_norm", "layer_0", "lm_head"]
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params["layer_0"]),
                                 jax.tree.leaves(full_params["layer_0"]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                      err_msg=jax.tree_util.keystr(path))
