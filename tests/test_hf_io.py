"""config.json vs stored tensors: every disagreement loads as transformers loads it, or raises.

Per family (llama, qwen2, gemma2, phi, phi3) a tiny random transformers model is saved, its
safetensors edited, and the folder loaded both by transformers (`AutoModelForCausalLM`) and by
our `from_pretrained`: where transformers gives a model, our logits must equal its logits (1e-4,
float32); where it starts random weights or stops, we raise an error that names the fix.
"""

import json
import logging
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tad_jax.models import from_pretrained  # noqa: E402

ATOL = 1e-4
_C = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
          num_attention_heads=2, max_position_embeddings=32)
FAMILIES = {
    "llama": ("LlamaConfig", dict(_C, num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", dict(_C, num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", dict(_C, num_key_value_heads=1, head_dim=8)),
    "phi": ("PhiConfig", _C),  # its head has a bias, which stays when the weight is tied
    "phi3": ("Phi3Config", dict(_C, num_key_value_heads=1, pad_token_id=0)),
}
IDS = np.array([[1, 5, 9, 13, 2, 40, 63]])
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _save(family, tied, path):
    cls, kwargs = FAMILIES[family]
    cfg = getattr(transformers, cls)(**kwargs, tie_word_embeddings=tied)
    if family == "gemma2":
        cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # weights large enough for O(1) logits: a wrong head shows
        for _, p in model.named_parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return load_file(path / "model.safetensors")


def _edited(base, path, tensors, config_changes=None):
    shutil.copytree(base, path)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    if config_changes:
        hf = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(hf | config_changes))
    return path


def _hf_load(path):
    """(logits, loading info) of transformers' own load, or the exception it raises."""
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 (transformers' own error types vary by version)
        return e, None
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits.numpy(), info


def _ours(path):
    model, params = from_pretrained(path)
    return model, np.asarray(model.apply({"params": params}, IDS).logits)


@pytest.fixture(scope="module", params=[(f, t) for f in FAMILIES for t in (True, False)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def saved(request, tmp_path_factory):
    family, tied = request.param
    base = tmp_path_factory.mktemp(f"{family}_{tied}")
    return family, tied, base, _save(family, tied, base)


def test_as_saved_matches_transformers(saved):
    _, tied, base, tensors = saved
    assert (HEAD in tensors) != tied
    want, _ = _hf_load(base)
    model, got = _ours(base)
    assert model.config.tie_word_embeddings == tied
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_tied_config_with_a_different_stored_head_uses_it_as_transformers(saved, tmp_path,
                                                                           caplog):
    family, tied, base, tensors = saved
    if not tied:
        pytest.skip("a tied config")
    head = np.random.default_rng(1).normal(size=tensors[EMBED].shape).astype(np.float32)
    path = _edited(base, tmp_path / "m", {**tensors, HEAD: head})
    want, _ = _hf_load(path)
    with caplog.at_level(logging.WARNING):
        model, got = _ours(path)
    assert "differs from the embedding" in caplog.text
    assert not model.config.tie_word_embeddings
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # The embedding-as-head model is far from it: the case is not vacuous.
    tied_logits, _ = _hf_load(base)
    assert np.abs(tied_logits - want).max() > 1.0


def test_tied_config_with_an_equal_stored_head_stays_tied(saved, tmp_path):
    _, tied, base, tensors = saved
    if not tied:
        pytest.skip("a tied config")
    path = _edited(base, tmp_path / "m", {**tensors, HEAD: tensors[EMBED].copy()})
    want, _ = _hf_load(path)
    model, got = _ours(path)
    assert model.config.tie_word_embeddings
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_tied_config_with_only_the_head_stored_ties_the_embedding_to_it(saved, tmp_path):
    _, tied, base, tensors = saved
    if not tied:
        pytest.skip("a tied config")
    stored = {k: v for k, v in tensors.items() if k != EMBED}
    stored[HEAD] = np.random.default_rng(2).normal(size=tensors[EMBED].shape).astype(np.float32)
    path = _edited(base, tmp_path / "m", stored)
    want, info = _hf_load(path)
    assert not info["missing_keys"]
    _, got = _ours(path)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_untied_config_without_a_stored_head_is_an_error(saved, tmp_path):
    family, tied, base, tensors = saved
    if tied:
        pytest.skip("an untied config")
    stored = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
    path = _edited(base, tmp_path / "m", stored)
    _, info = _hf_load(path)
    assert HEAD in info["missing_keys"]  # transformers starts a random head
    with pytest.raises(ValueError, match="set tie_word_embeddings: true"):
        from_pretrained(path)


def test_an_extra_tensor_is_an_error(saved, tmp_path):
    _, _, base, tensors = saved
    path = _edited(base, tmp_path / "m", {**tensors, "model.layers.0.extra.weight":
                                          np.zeros(3, np.float32)})
    _, info = _hf_load(path)
    assert "model.layers.0.extra.weight" in info["unexpected_keys"]  # transformers drops it
    with pytest.raises(ValueError, match=r"1 tensors the config does not use.*extra"):
        from_pretrained(path)


def test_a_missing_tensor_is_an_error(saved, tmp_path):
    _, _, base, tensors = saved
    name = next(k for k in sorted(tensors) if ".mlp." in k and k.endswith("weight"))
    path = _edited(base, tmp_path / "m", {k: v for k, v in tensors.items() if k != name})
    _, info = _hf_load(path)
    assert name in info["missing_keys"]  # transformers starts it at random
    with pytest.raises(ValueError, match=rf"lacks 1 tensors.*{name}"):
        from_pretrained(path)


def test_a_shape_mismatch_is_an_error_as_in_transformers(saved, tmp_path):
    _, _, base, tensors = saved
    name = next(k for k in sorted(tensors) if ".mlp." in k and k.endswith("weight"))
    path = _edited(base, tmp_path / "m", {**tensors, name: tensors[name][:-1]})
    err, _ = _hf_load(path)
    assert isinstance(err, Exception)  # transformers refuses (ignore_mismatched_sizes=False)
    with pytest.raises(ValueError, match=rf"{name} has shape"):
        from_pretrained(path)


def test_head_bias_of_a_tied_phi_round_trips(tmp_path):
    """Our save_pretrained of a tied Phi keeps lm_head.bias, and transformers reads it back."""
    from tad_jax.models import save_pretrained

    _save("phi", True, tmp_path / "hf")
    model, params = from_pretrained(tmp_path / "hf")
    assert "bias" in params["lm_head"] and "kernel" not in params["lm_head"]
    save_pretrained(model, params, tmp_path / "ours")
    want, info = _hf_load(tmp_path / "ours")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, IDS).logits), want,
                               atol=ATOL, rtol=0)
