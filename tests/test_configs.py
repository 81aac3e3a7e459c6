"""Tests of configs/*.py and tad_jax.config: every config loads, validates and takes overrides."""

import glob
import os
import re

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from tad_jax import config as tc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
PAPER = ["gemma2_9b", "qwen15_1p8b_to_1p2b", "qwen15_1p8b_to_0p5b", "phi2", "qwen25_3b",
         "phi3_to_tinyllama_owm", "phi3_to_tinyllama_sft"]
GROUPS = ("teacher", "student", "loss", "opt", "data", "ckpt", "mesh", "eval", "log")


def _load(path, *overrides):
    """Loads a config file the way scripts/train.py does (absl + config_flags)."""
    argv = ["train.py", f"--config={path}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def _path(name):
    return os.path.join(ROOT, "configs", f"{name}.py")


def test_every_paper_config_exists():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    assert set(PAPER) | {"tiny"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_every_config_loads_and_validates(path):
    cfg = _load(path)
    assert isinstance(cfg, ml_collections.ConfigDict)
    for group in GROUPS:
        assert group in cfg, f"{path} lacks the {group} group"
    assert "seed" in cfg and "steps" in cfg and "train_tokens" in cfg
    tc.validate_config(cfg, check_paths=False)


@pytest.mark.parametrize("name", PAPER + ["tiny"])
def test_every_field_has_a_comment(name):
    with open(_path(name)) as f:
        src = f.read().splitlines()
    fields = [i for i, ln in enumerate(src) if re.match(r"\s+c\.[\w.]+ = ", ln)]
    assert fields
    # The comment sits on the field's line, or on the line(s) right above it.
    uncommented = [src[i].strip() for i in fields
                   if "#" not in src[i] and not src[i - 1].strip().startswith("#")]
    assert not uncommented, uncommented


def test_base_config_fields_are_commented():
    with open(os.path.join(ROOT, "tad_jax", "config.py")) as f:
        src = f.read().splitlines()
    fields = [i for i, ln in enumerate(src) if re.match(r"\s+[a-z]\.\w+ = ", ln)]
    assert len(fields) > 40
    uncommented = [src[i].strip() for i in fields
                   if "#" not in src[i] and not src[i - 1].strip().startswith("#")]
    assert not uncommented, uncommented


@pytest.mark.parametrize("name", PAPER)
@pytest.mark.parametrize("divergence", ["kl", "rkl", "jsd", "tad"])
def test_divergence_is_one_override(name, divergence):
    cfg = _load(_path(name), f"--config.loss.divergence={divergence}")
    assert cfg.loss.divergence == divergence
    tc.validate_config(cfg, check_paths=False)


def test_paper_hyperparameters():
    g = _load(_path("gemma2_9b"))
    assert (g.loss.top_k, g.loss.beta, g.loss.temperature) == (10, 2.0, 1.0)
    assert (g.opt.lr, g.opt.weight_decay, g.data.global_batch_size, g.data.seq_len) == (
        1e-4, 0.1, 128, 2048)
    assert g.loss.cosine_weight > 0 and g.student.overrides["num_layers"] == 42 // 3
    assert _load(_path("phi2")).student.overrides["num_layers"] == 32 // 2
    assert _load(_path("qwen25_3b")).student.overrides["num_layers"] == 36 // 2
    owm, sft = _load(_path("phi3_to_tinyllama_owm")), _load(_path("phi3_to_tinyllama_sft"))
    assert owm.opt.lr == 3e-5 and owm.loss.vocab_size == 32000
    assert (sft.opt.lr, sft.data.global_batch_size, sft.data.seq_len, sft.data.mode) == (
        1e-5, 32, 2048, "sft")
    # train_tokens decides the step count: 2B tokens at 128 x 2048 per step.
    assert tc.num_steps(g) == -(-2_000_000_000 // (128 * 2048))


def test_unknown_override_key_is_an_error():
    with pytest.raises(Exception, match="no_such_field"):
        _load(_path("tiny"), "--config.loss.no_such_field=1")


@pytest.mark.parametrize("change, error, match", [
    (dict(loss=dict(divergence="kld")), ValueError, "loss.divergence"),
    (dict(loss=dict(beta=0.0)), ValueError, "loss.beta"),
    (dict(teacher=dict(random_init=False)), FileNotFoundError, "teacher.path is empty"),
    (dict(teacher=dict(path="/no/such/teacher")), FileNotFoundError, "no config.json"),
    (dict(teacher=dict(preset="gemma2_9b")), ValueError, "keep one of them"),
    (dict(student=dict(path="/no/such/student")), FileNotFoundError, "student.path"),
    (dict(student=dict(preset="tinyllama-1.1b")), FileNotFoundError, "student.path is empty"),
    (dict(opt=dict(grad_accum_steps=-1)), ValueError, "grad_accum_steps"),
    (dict(steps=0), ValueError, "steps"),
    (dict(student=dict(dtype="fp8")), ValueError, "student.dtype"),
    # Values that trained silently or failed late without naming the field (a reviewer's list).
    (dict(opt=dict(lr=float("nan"))), ValueError, "opt.lr=nan must be a finite"),
    (dict(opt=dict(warmup_steps=-2)), ValueError, "opt.warmup_steps"),
    (dict(opt=dict(b1=1.5)), ValueError, r"opt.b1=1.5 must be in \[0, 1\)"),
    (dict(opt=dict(b2=1.0)), ValueError, "opt.b2"),
    (dict(opt=dict(eps=0.0)), ValueError, "opt.eps"),
    (dict(opt=dict(weight_decay=-0.1)), ValueError, "opt.weight_decay"),
    (dict(opt=dict(clip_norm=-1.0)), ValueError, "opt.clip_norm"),
    (dict(opt=dict(min_lr_ratio=2.0)), ValueError, "opt.min_lr_ratio"),
    (dict(max_steps_per_run=-1), ValueError, "max_steps_per_run"),
    (dict(data=dict(global_batch_size=0)), ValueError, "data.global_batch_size"),
    (dict(eval=dict(batch_size=0)), ValueError, "eval.batch_size"),
    (dict(eval=dict(max_batches=-1)), ValueError, "eval.max_batches"),
    (dict(loss=dict(chunk_size=0)), ValueError, "--config.loss.chunk_size"),
    (dict(loss=dict(jsd_weight=1.5)), ValueError, "loss.jsd_weight"),
    (dict(loss=dict(vocab_size=-1)), ValueError, "loss.vocab_size"),
    (dict(loss=dict(cosine_weight=-1.0)), ValueError, "loss.cosine_weight"),
    (dict(ckpt=dict(keep=0)), ValueError, "ckpt.keep"),
])
def test_bad_config_values_are_clear_errors(change, error, match):
    cfg = _load(_path("tiny"))
    with cfg.unlocked():
        cfg.update(change)
    with pytest.raises(error, match=match):
        tc.validate_config(cfg)


def test_config_differences_ignore_what_does_not_change_the_math():
    a = tc.config_to_dict(_load(_path("tiny")))
    b = tc.config_to_dict(_load(_path("tiny"), "--config.max_steps_per_run=99",
                                "--config.log.every_steps=7", "--config.ckpt.keep=9",
                                "--config.teacher.attention=xla",
                                "--config.student.attention=splash"))
    assert tc.config_differences(a, b) == []
    # Checkpoints written before the attention switches existed resume too.
    old = {**a, "teacher": {k: v for k, v in a["teacher"].items() if k != "attention"}}
    assert tc.config_differences(old, a) == []
    c = tc.config_to_dict(_load(_path("tiny"), "--config.opt.lr=0.5"))
    assert tc.config_differences(a, c) == ["opt.lr"]
    # The step count shapes the learning-rate schedule: changing it is a different run.
    d = tc.config_to_dict(_load(_path("tiny"), "--config.steps=99"))
    assert tc.config_differences(a, d) == ["steps"]


def test_a_missing_config_file_is_reported_as_such(tmp_path):
    # With an override, the file's own error was hidden behind "Unknown config field 'loss'"
    # (a reviewer's finding).
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/no_such.py",
                           "--workdir", str(tmp_path), "--config.loss.beta=3"], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "No such file" in proc.stderr and "Unknown config field" not in proc.stderr


def test_check_overrides_names_the_field_and_the_valid_ones():
    cfg = _load(_path("tiny"))
    tc.check_overrides(cfg, ["x", "--config.loss.beta=3", "--config.steps=2"])
    with pytest.raises(ValueError, match=r"loss has no field 'betta'.*'beta'"):
        tc.check_overrides(cfg, ["x", "--config.loss.betta=3"])
    with pytest.raises(ValueError, match="the config has no field 'lost'"):
        tc.check_overrides(cfg, ["x", "--config.lost.beta=3"])
