"""Tests of tad_jax.dry_run: the abstract compile of a full-size config and its figures."""

import os
import re
import subprocess
import sys

import pytest
from tiny_setup import ENV, ROOT


@pytest.fixture(scope="module")
def gemma_dry_run():
    """`scripts/train.py --dry_run` of configs/gemma2_9b.py on the 8 fake CPU devices, with the
    teacher cut to 3 layers (the student to 1) so the abstract compile fits CI's budget."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--dry_run",
           "--config", os.path.join(ROOT, "configs", "gemma2_9b.py"),
           "--config.dry_run.num_layers=3"]
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode()


@pytest.mark.slow
def test_dry_run_of_gemma2_9b_prints_its_figures(gemma_dry_run):
    from tad_jax.models import PRESETS, STUDENT_OVERRIDES

    out = gemma_dry_run
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices)" in out
    assert "teacher 3 layers, student 1 layers" in out
    teacher = PRESETS["gemma2-9b"]
    teacher = teacher.replace(num_layers=3, layer_types=teacher.layer_types[:3])
    student = teacher.replace(**{**STUDENT_OVERRIDES["gemma2-9b-student"][1], "num_layers": 1,
                                 "layer_types": None})  # layer types do not change the count
    counts = [int(x.replace(",", "")) for x in
              re.search(r"parameters: teacher ([\d,]+)\s+student ([\d,]+)", out).groups()]
    assert counts == [teacher.num_params(), student.num_params()]
    # Only the student's non-embedding parameters train (Gemma's tied embedding is frozen).
    trainable = int(re.search(r"trainable ([\d,]+)", out).group(1).replace(",", ""))
    assert trainable == student.num_params() - student.vocab_size * student.hidden_size
    mem = float(re.search(r"memory per device: ([\d.]+) GiB", out).group(1))
    assert mem > 0
    flops = float(re.search(r"FLOPs per token: ([\d.e+]+)", out).group(1))
    # A lower bound from the sizes alone: teacher forward (2 FLOPs per weight) + student forward
    # and backward through the activations (4 per weight) + weight gradients (2 per trained one).
    assert flops > 2 * teacher.num_params() + 4 * student.num_params() + 2 * trainable
    assert "PFLOPs for 1,000,000 tokens" in out


@pytest.mark.slow
def test_tad_step_costs_at_most_one_percent_more_flops_than_kd(gemma_dry_run):
    ratio = float(re.search(r"ratio ([\d.]+)", gemma_dry_run).group(1))
    assert 1.0 <= ratio <= 1.01, ratio
