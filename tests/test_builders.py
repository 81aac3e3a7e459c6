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


def _tiny_gemma2_folder(path):
    """A random 3-layer Gemma2 saved by transformers (sliding and full layers), as a teacher."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    hf._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf).eval()
    with torch.no_grad():  # O(1) logits: a layer out of place shows
        for _, p in model.named_parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    ids = np.array([[1, 5, 9, 13, 2, 40, 63, 7, 22, 31]])
    with torch.no_grad():
        return ids, model(torch.tensor(ids)).logits.numpy()


def test_scanned_teacher_loads_from_a_folder_with_transformers_logits(tmp_path):
    """teacher.scan_layers=True: the checkpoint's layers stacked on a `layers` axis, sharded over
    the mesh; logits equal transformers' forward (and the unscanned teacher's), and the student
    initialised from it equals the one initialised from the unscanned teacher."""
    from tad_jax.builders import build_student

    ids, want = _tiny_gemma2_folder(tmp_path / "teacher")
    out = {}
    for scan in (False, True):
        cfg = tiny_config(**{"mesh.num_devices": 2, "teacher.path": str(tmp_path / "teacher"),
                             "teacher.random_init": False, "teacher.scan_layers": scan,
                             "loss.cosine_weight": 0.0})
        with cfg.unlocked():
            cfg.teacher.model = {}
        mesh = sharding.make_mesh(cfg.mesh)
        with run_setup.mesh_context(mesh):
            model, params = build_teacher(cfg, mesh)
            student, s_params, _ = build_student(cfg, model, params, mesh)
        logits = np.asarray(model.apply({"params": params}, ids).logits)
        out[scan] = (model, params, logits, student, s_params)
    model, params, logits, student, s_params = out[True]
    assert model.config.scan_layers and "layers" in params and "layer_0" not in params
    assert params["layers"]["attn"]["q"]["kernel"].shape[0] == 3
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, out[False][2], atol=1e-5, rtol=0)
    assert student.config == out[False][3].config and not student.config.scan_layers
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s_params),
                            jax.tree.leaves(out[False][4]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))


def test_a_bad_remat_policy_names_the_choices():
    from tad_jax.builders import abstract_student, abstract_teacher

    cfg = tiny_config(**{"student.remat": True, "student.remat_policy": "dots"})
    with pytest.raises(ValueError, match=r"--config.student.remat_policy to one of "
                                         r"\['nothing_saveable', 'dots_with_no_batch_dims"):
        abstract_student(cfg, *abstract_teacher(cfg, None)[:2], None)


def test_remat_policy_reaches_the_layers_and_changes_the_recomputed_flops():
    """The backward pass recomputes what the policy does not save: all of the forward
    (nothing_saveable), all but the projections (dots_with_no_batch_dims_saveable), all but
    every matmul (dots_saveable). Measured as the lowered step's FLOPs (tad_jax.aot) against a
    hand count of the student's projection and attention matmuls."""
    from tad_jax import aot
    from tad_jax.builders import abstract_student, abstract_teacher, shared_vocab_size

    flops = {}
    for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", None):
        cfg = tiny_config(**{"student.remat": policy is not None,
                             "student.remat_policy": policy or "nothing_saveable",
                             "opt.grad_accum_steps": 1})
        cfg = run_setup.resolved_config(cfg)
        tm, ta, _ = abstract_teacher(cfg, None)
        sm, sa, mask = abstract_student(cfg, tm, ta, None)
        assert sm.config.remat_policy == (policy or "nothing_saveable")
        models = aot.Models(tm, ta, sm, sa, mask, shared_vocab_size(cfg, tm.config, sm.config))
        flops[policy] = aot.step_costs(cfg, models, 1, model_flops=False).flops
    # The student's one layer, forward: projections 2·N·(d·(H+2K)·e + H·e·d + 2·d·F) (the
    # MLP's down projection is not rerun: the backward pass never reads its output) and the
    # attention matmuls (scores and values) 2 · 2·B·H·T·T·e; N = B·T tokens.
    c = sm.config
    b, t = cfg.data.global_batch_size, cfg.data.seq_len
    d, f, h, k, e = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    proj = 2 * b * t * (d * (h + 2 * k) * e + h * e * d + 2 * d * f)
    attn = 2 * 2 * b * h * t * t * e
    assert flops["nothing_saveable"] - flops["dots_with_no_batch_dims_saveable"] == (
        pytest.approx(proj, rel=0.05))
    assert flops["dots_with_no_batch_dims_saveable"] - flops["dots_saveable"] == (
        pytest.approx(attn, rel=0.05))
    assert flops["dots_saveable"] == pytest.approx(flops[None], rel=0.02)  # elementwise only
