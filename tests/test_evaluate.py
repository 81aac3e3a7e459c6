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


def test_export_never_replaces_the_run_or_the_current_directory(tmp_path, monkeypatch):
    # A reviewer's finding: --out WORKDIR --overwrite deleted the run; --out . emptied the folder
    # the user stood in. Both are refused before anything is read or written.
    run = tmp_path / "runs" / "a"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    here = tmp_path / "here"
    here.mkdir()
    (here / "important.txt").write_text("precious")
    monkeypatch.chdir(here)
    for out in (run, tmp_path / "runs", tmp_path, ".", "..", "../runs/a/../a"):
        with pytest.raises(ValueError, match="is or holds"):
            evaluate.export_hf(run, out, overwrite=True)
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    assert (here / "important.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "runs"]


def test_export_overwrite_replaces_only_an_hf_folder(tmp_path):
    out, file = tmp_path / "out", tmp_path / "file"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    file.write_text("also precious")
    for target in (out, file):
        with pytest.raises(FileExistsError, match="not an HF folder"):
            evaluate.export_hf(tmp_path / "run", target, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    assert file.read_text() == "also precious"


def test_export_refuses_the_runs_own_input_folders(tmp_path):
    # An HF folder the run reads (its teacher, here) has a config.json, so --overwrite would
    # have replaced it (a reviewer's finding).
    import ml_collections

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    config = ml_collections.ConfigDict({"teacher": {"path": str(teacher)},
                                        "student": {"path": ""}, "data": {"tokenizer": ""}})
    with pytest.raises(ValueError, match="is the run's teacher.path"):
        evaluate._refuse_run_inputs(teacher.resolve(), config)
    evaluate._refuse_run_inputs((tmp_path / "hf").resolve(), config)


def test_replace_sets_the_old_folder_aside_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    out, new = tmp_path / "hf", tmp_path / ".hf.tmp"
    for folder, text in ((out, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    rename = evaluate.os.rename

    def failing(src, dst):  # the new folder cannot be moved into place
        if pathlib.Path(src) == new:
            raise OSError("disk full")
        rename(src, dst)

    monkeypatch.setattr(evaluate.os, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        evaluate._replace(out, new)
    assert (out / "config.json").read_text() == "old"  # put back
    monkeypatch.setattr(evaluate.os, "rename", rename)
    evaluate._replace(out, new)
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing set aside is left


# ---------------------------------------------------------------------------------------------
# The tiny run end to end: train a few steps, evaluate, export; checked against PyTorch.


def _load_config(name):
    import importlib.util

    path = pathlib.Path(__file__).parent.parent / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tad_jax import train

    config = _load_config("tiny")
    config.steps = 6  # optimizer steps.
    config.eval.every_steps = 3  # two points on the held-out KL curve.
    config.log.progress = False
    config.log.tensorboard = False
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    train.train_and_evaluate(config, str(workdir))
    return config, workdir


def _torch_logits(hf_dir, batch):
    """[B, T, V] logits of an HF folder, each packed segment run as its own sequence."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids_bt, seg_bt = batch["input_ids"], batch["segment_ids"]
    out = np.zeros(ids_bt.shape + (model.config.vocab_size,), np.float32)
    with torch.no_grad():
        for b in range(ids_bt.shape[0]):
            for s in np.unique(seg_bt[b][seg_bt[b] > 0]):
                cols = np.nonzero(seg_bt[b] == s)[0]
                ids = torch.as_tensor(ids_bt[b, cols][None].astype(np.int64))
                out[b, cols] = model(ids).logits[0].numpy()
    return out


@pytest.mark.slow
def test_evaluate_matches_pytorch_reference(tiny_run, tmp_path):
    """evaluate() against transformers' forward of the exported student and teacher + numpy."""
    import numpy as np
    from test_metrics import reference_metrics

    from tad_jax import train
    from tad_jax.data import make_eval_iterator
    from tad_jax.models import save_pretrained
    from tad_jax.run_setup import resolved_config

    config, workdir = tiny_run
    result = evaluate.evaluate(config, workdir)
    saved = json.loads((workdir / evaluate.EVAL_FILE).read_text())
    assert saved["step"] == 6 and saved["kl"] == result["kl"]
    assert all(_is_png(p) for p in result["plots"]) and len(result["plots"]) == 2
    last = [r for r in train.read_metrics(str(workdir)) if "eval_kl" in r][-1]
    np.testing.assert_allclose(result["kl"], last["eval_kl"], rtol=1e-5)  # train's own eval step

    student_dir = evaluate.export_hf(workdir, tmp_path / "student")
    teacher_dir = tmp_path / "teacher"
    save_pretrained(*train.build_teacher(resolved_config(config)), teacher_dir)
    batches = list(make_eval_iterator(resolved_config(config).data,
                                      batch_size=config.eval.batch_size,
                                      max_batches=config.eval.max_batches))
    cat = lambda f: np.concatenate([f(b) for b in batches])
    want = reference_metrics(cat(lambda b: _torch_logits(student_dir, b)),
                             cat(lambda b: _torch_logits(teacher_dir, b)),
                             cat(lambda b: b["targets"]), cat(lambda b: b["loss_mask"]),
                             sorted(result["tail_mass"]), 10)
    for key in ("tokens", "kl", "student_ce", "teacher_ce", "mismatch_rate", "top1_agreement",
                "full_ece"):
        np.testing.assert_allclose(result[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for k, v in want["tail_mass"].items():
        np.testing.assert_allclose(result["tail_mass"][k], v, rtol=1e-4, err_msg=f"tail K={k}")


@pytest.mark.slow
def test_export_loads_in_transformers_and_matches(tiny_run, tmp_path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tad_jax import train

    config, workdir = tiny_run
    out = evaluate.export_hf(workdir, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The Python tutorial", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model(ids).logits.numpy()
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4)
    student, params, _ = train.restore_student(config, str(workdir))
    want = student.apply({"params": params}, ids.numpy().astype(np.int32)).logits
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)
    with pytest.raises(FileExistsError):
        evaluate.export_hf(workdir, out)
    assert evaluate.export_hf(workdir, out, overwrite=True) == out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".hf.tmp-*"))  # the staging folder is gone


@pytest.mark.slow
def test_evaluate_a_fused_run_in_chunks(tiny_run, monkeypatch):
    """A loss.fused run is evaluated in loss.chunk_size chunks, as its training run's eval step
    is (evaluate() built whole [B, T, V] logits, 33.6 GB at Gemma2 sizes: a reviewer's
    finding), with the same figures up to float32 rounding."""
    import numpy as np

    from tad_jax import step

    config, workdir = tiny_run
    whole = evaluate.evaluate(config, workdir, write=False)
    fused = config.copy_and_resolve_references()
    fused.loss.fused, fused.loss.chunk_size = True, 16
    seen, make = [], step.make_eval_step
    monkeypatch.setattr(step, "make_eval_step",
                        lambda *a, **k: seen.append(k.get("chunk_size")) or make(*a, **k))
    chunked = evaluate.evaluate(fused, workdir, write=False)
    assert seen == [16]
    for key in ("tokens", "kl", "student_ce", "teacher_ce", "full_ece", "mismatch_rate",
                "top1_agreement"):
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_evaluate_names_the_fields_that_differ_from_the_run(tiny_run, caplog):
    """--config overrides that change the student fail with the fields named (it was orbax's
    4 KB tree dump); ones that keep its shapes evaluate with a warning naming them."""
    config, workdir = tiny_run
    two_layers = config.copy_and_resolve_references()
    two_layers.student.overrides = dict(num_layers=2)
    with pytest.raises(ValueError, match=r"differs from the run's in: student\.overrides"):
        evaluate.evaluate(two_layers, workdir, write=False)
    other_beta = config.copy_and_resolve_references()
    other_beta.loss.beta = 5.0
    with caplog.at_level("WARNING", logger="tad_jax.evaluate"):
        evaluate.evaluate(other_beta, workdir, write=False, max_batches=1)
    assert "differs from the run's (saved with its checkpoint) in: loss.beta" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tad_jax.evaluate"):
        evaluate.evaluate(config, workdir, write=False, max_batches=1)
    assert "differs" not in caplog.text
    other_teacher = config.copy_and_resolve_references()  # a path a resumed run may change
    other_teacher.teacher.path = "/elsewhere/teacher"
    saved = evaluate.load_run_config(workdir)
    assert evaluate._differences_from_run(other_teacher, saved) == ["teacher.path"]


@pytest.mark.slow
def test_evaluate_script_defaults_to_the_runs_saved_config(tiny_run, tmp_path):
    """`scripts/evaluate.py --workdir DIR` without --config evaluates with the config saved
    with the checkpoint: the same figures as evaluate() with the run's own config."""
    import shutil
    import subprocess
    import sys

    from tiny_setup import ENV, ROOT

    config, workdir = tiny_run
    want = evaluate.evaluate(config, workdir, write=False, max_batches=1)
    run = tmp_path / "run"  # a copy: eval.json and the plots are written into the run folder
    shutil.copytree(workdir, run)
    proc = subprocess.run([sys.executable, "scripts/evaluate.py", "--workdir", str(run),
                           "--max_batches=1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((run / evaluate.EVAL_FILE).read_text())
    assert got["step"] == want["step"] and got["tokens"] == want["tokens"]
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-6)
    assert "differs" not in proc.stderr
