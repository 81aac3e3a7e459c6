"""Tests for tad_jax.evaluate and tad_jax.plots: plots, bad input, and the tiny run end to end."""

import json
import pathlib

import pytest

from tad_jax import evaluate, plots


def _write_metrics(workdir: pathlib.Path, rows):
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _is_png(path) -> bool:
    path = pathlib.Path(path)
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_read_kl_curve_tokens_from_steps_or_field(tmp_path):
    rows = [{"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0, "eval_kl": 1.5},
            {"step": 20, "loss": 1.0, "eval_kl": 1.25}]
    _write_metrics(tmp_path / "a", rows)
    assert plots.read_kl_curve(tmp_path / "a", 512) == ([5120.0, 10240.0], [1.5, 1.25],
                                                         "training tokens")
    assert plots.read_kl_curve(tmp_path / "a")[0] == [10.0, 20.0]
    _write_metrics(tmp_path / "b", [{"step": 1, "tokens": 77, "eval_kl": 2.0}])
    assert plots.read_kl_curve(tmp_path / "b", 512)[0] == [77.0]


def test_plot_heldout_kl_several_runs(tmp_path):
    _write_metrics(tmp_path / "kd", [{"step": s, "eval_kl": 2.0 / s} for s in (10, 20, 30)])
    _write_metrics(tmp_path / "tad", [{"step": s, "eval_kl": 1.8 / s} for s in (10, 20, 30)])
    out = plots.plot_heldout_kl({"KD": tmp_path / "kd", "TAD": tmp_path / "tad"},
                                tmp_path / "plots" / "fig1.png", tokens_per_step=512)
    assert _is_png(out)


def test_plot_tail_and_mismatch_accepts_json_keys(tmp_path):
    result = {"tail_mass": {"1": 0.6, "2": 0.5, "5": 0.35, "10": 0.25, "20": 0.18, "50": 0.1},
              "mismatch_rate": 0.42}
    out = plots.plot_tail_and_mismatch({"SmolLM2-135M": result}, tmp_path / "fig2.png")
    assert _is_png(out)


def test_plot_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="train a run"):
        plots.read_kl_curve(tmp_path)
    _write_metrics(tmp_path, [{"step": 1, "loss": 2.0}])
    with pytest.raises(ValueError, match="eval.every_steps"):
        plots.read_kl_curve(tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_heldout_kl({}, tmp_path / "x.png")


def test_no_checkpoint_says_train_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        evaluate.require_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="train first"):
        evaluate.require_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="train first"):
        evaluate.export_hf(tmp_path, tmp_path / "out")


def test_export_refuses_non_empty_target(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate.export_hf(tmp_path / "run", out)
    assert (out / "keep.txt").read_text() == "precious"
