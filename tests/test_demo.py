"""The README's demo, reduced: real SmolLM2 teacher, a tiny slice of the real corpus, a few steps.

Runs the three scripts as a user would (`scripts/train.py --config configs/demo.py`, then
`scripts/evaluate.py` with lm-evaluation-harness on the local tasks, then `scripts/export_hf.py`)
in subprocesses with one CPU device, as `make demo` does, and checks eval.json, the plots and the
HF export (transformers loads it, its logits match ours, it generates). The teacher conversion is
cached in $TAD_JAX_CACHE (default ~/.cache/tad_jax), so only the first run on a machine pays for it
(~30 s).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SLICE_CHARS = 60_000  # ~15k tokens: enough documents for a held-out split and a few steps.


def _env():
    """The environment without conftest's 8 fake devices: `make demo` runs on one CPU device."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["XLA_FLAGS"] = flags.strip()
    return env


def _run(*args, timeout=900):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def corpus_slice(tmp_path_factory):
    from tad_jax import assets

    text = "".join(assets.read_text(p) for p in assets.corpus_files())[:SLICE_CHARS]
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_demo_pipeline_reduced(corpus_slice, tmp_path):
    workdir = tmp_path / "demo"
    reduced = [f"--config.data.train_files={corpus_slice}", "--config.data.val_fraction=0.1",
               "--config.data.text_chunk_chars=1000", "--config.eval.max_batches=1"]
    _run("scripts/train.py", "--config", "configs/demo.py", "--workdir", str(workdir),
         "--config.steps=2", "--config.eval.every_steps=1", "--config.log.every_steps=1",
         "--config.log.progress=False", *reduced)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_kl" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)

    # As `make demo` ends: lm-evaluation-harness on the local tasks, student (exported to a
    # temporary folder here) and teacher.
    _run("scripts/evaluate.py", "--config", "configs/demo.py", "--workdir", str(workdir), *reduced,
         "--lm_eval_tasks=local")
    harness = json.loads((workdir / "lm_eval.json").read_text())
    for who in ("student", "teacher"):
        assert 0 <= harness[who]["tad_mc"]["acc"] <= 1
    # The real teacher reads our English paragraphs far better than a 2-step 8-layer student.
    ppl = {who: harness[who]["tad_text_ppl"]["word_perplexity"] for who in ("student", "teacher")}
    assert ppl["teacher"] < ppl["student"] / 2, ppl
    result = json.loads((workdir / "eval.json").read_text())
    assert result["step"] == 2 and result["tokens"] > 0
    assert 0 < result["kl"] < 20 and 0 <= result["full_ece"] <= 2
    assert 0 <= result["mismatch_rate"] <= 1 and 0 <= result["top1_agreement"] <= 1
    # A real teacher: its CE on English prose is far below log(49152) ≈ 10.8, and α_T(K) falls.
    assert result["teacher_ce"] < 6
    tails = [result["tail_mass"][k] for k in ("1", "2", "5", "10", "20", "50")]
    assert all(a > b for a, b in zip(tails, tails[1:], strict=False))
    for name in ("heldout_kl.png", "tail_mass_mismatch.png"):
        png = workdir / "plots" / name
        assert png.is_file() and png.stat().st_size > 1000, png

    out = tmp_path / "hf"
    _run("scripts/export_hf.py", "--workdir", str(workdir), "--out", str(out))
    _check_export(workdir, out)
    proc = subprocess.run([sys.executable, "scripts/export_hf.py", "--workdir", str(workdir),
                           "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr


def _check_export(workdir, out):
    """transformers loads the export, its logits match the JAX student at 1e-4, it generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tad_jax import evaluate, train

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The for statement in Python differs a bit from", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model(ids).logits.numpy()
        gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    config = evaluate.load_run_config(workdir)
    student, params, _ = train.restore_student(config, str(workdir))
    assert model.config.num_hidden_layers == student.config.num_layers == 8
    want = student.apply({"params": params}, ids.numpy().astype(np.int32)).logits
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)
