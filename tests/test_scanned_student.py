"""A scanned student (`student.scan_layers=True`, its layers stacked on a `layers` axis) through
the paths that store it: a checkpoint, a resumed run, the HF export (transformers' logits)."""

import numpy as np
import pytest
from tiny_setup import tiny_config

from tad_jax import evaluate, train


@pytest.mark.slow
def test_scanned_student_checkpoints_resumes_and_exports(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    changes = {"steps": 4, "student.scan_layers": True, "student.remat": True,
               "student.overrides": {"num_layers": 2}, "eval.every_steps": 100,
               "log.every_steps": 1, "log.tensorboard": False}
    # Uninterrupted, and in two runs of 2 steps (the second resumes from the first's checkpoint).
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train.train_and_evaluate(tiny_config(**changes), whole)
    for _ in range(2):
        train.train_and_evaluate(tiny_config(**changes, max_steps_per_run=2), parts)
    a, b = train.read_metrics(whole), train.read_metrics(parts)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), (ra, rb)
    student, params, _ = train.restore_student(tiny_config(**changes), parts)
    assert student.config.scan_layers and params["layers"]["attn"]["q"]["kernel"].shape[0] == 2
    out = evaluate.export_hf(parts, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 2
    ids = np.array([[3, 17, 99, 250, 7, 42]], np.int32)
    with torch.no_grad():
        got = model(torch.as_tensor(ids.astype(np.int64))).logits.numpy()
    want = np.asarray(student.apply({"params": params}, ids).logits)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
