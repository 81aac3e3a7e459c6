"""`from_pretrained` / `save_pretrained`: HF folders (config.json + safetensors) <-> Flax params.

Reading is lazy: one tensor at a time is read from the safetensors files (memory-mapped),
converted with the family's hooks (`convert.py`), cast and placed straight onto its device or
sharding, so a large teacher never needs a second full copy in host memory. With
`scan_layers`, the per-layer tensors of one parameter are stacked on the host first (one
parameter's worth of memory, not the model's).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open
from safetensors.numpy import save_file

from tad_jax.models.config import ModelConfig
from tad_jax.models.convert import HOOKS, expand_rules
from tad_jax.models.decoder import Decoder, init_params, unbox

logger = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
_DEFAULT_SHARD_BYTES = 5 * 1024**3


def _weight_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> safetensors file, from model.safetensors or the sharded index."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / fname for name, fname in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.exists()})
        if missing:
            raise FileNotFoundError(
                f"{index} lists shard files that are missing: {missing}. Download the complete "
                "checkpoint (every model-*.safetensors file) into the same folder.")
        return files
    if single.exists():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    bins = sorted(p.name for p in path.glob("*.bin"))
    hint = (f" Found PyTorch .bin files {bins}: re-save them with transformers "
            "(`model.save_pretrained(path, safe_serialization=True)`)." if bins else "")
    raise FileNotFoundError(
        f"No model.safetensors or model.safetensors.index.json in {path}.{hint}")


def _flax_shapes(model: Decoder) -> dict[str, tuple[int, ...]]:
    """'a/b/c' -> shape of every parameter in the unscanned layout."""
    cfg = model.config.replace(scan_layers=False, remat=False)
    shapes = init_params(Decoder(cfg), jax.random.PRNGKey(0), abstract=True)
    flat = flatten_dict(shapes, sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def _expected_hf_shape(rule, shapes, config) -> tuple[int, ...]:
    structs = [jax.ShapeDtypeStruct(shapes[p], jnp.float32) for p in rule.flax]
    return tuple(jax.eval_shape(lambda ws: HOOKS[rule.hook][1](ws, config), structs).shape)


def _dropped_layer(name: str, num_layers: int | None) -> bool:
    """Is `name` a tensor of a layer >= num_layers (layers deliberately not loaded)?"""
    if num_layers is None or not name.startswith("model.layers."):
        return False
    return int(name.split(".")[2]) >= num_layers


def _check_names(rules, files, config, first_layers: int | None = None) -> None:
    wanted = {r.hf for r in rules}
    missing = sorted(wanted - set(files))
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:5]}: "
            "a partial download, or config.json describes another model (check num_hidden_layers, "
            "tie_word_embeddings and the bias flags).")
    extra = sorted(n for n in set(files) - wanted if not n.endswith(_IGNORED_SUFFIXES)
                   and not (n == _HEAD and config.tie_word_embeddings)
                   and not _dropped_layer(n, first_layers))
    if extra:
        raise ValueError(
            f"The checkpoint has {len(extra)} tensors the config does not use, e.g. {extra[:5]}: "
            "config.json and the weights disagree (layer count, biases, model_type).")


_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _read_tensor(files, name) -> np.ndarray:
    with safe_open(files[name], framework="numpy") as f:
        return f.get_tensor(name)


def _resolve_head(config: ModelConfig, files: dict) -> tuple[ModelConfig, dict[str, str]]:
    """Settles what config.json's `tie_word_embeddings` and the stored head tensors disagree on.

    As transformers 5 loads such folders (checked against 5.24 in tests/test_hf_io.py):
      * tied, but an `lm_head.weight` that differs from the embedding is stored: the stored head
        is used, untied (transformers warns and does not tie); an equal one is the tied head.
      * tied, and only `lm_head.weight` stored (no embedding): the embedding is that tensor.
      * untied, and no `lm_head.weight` stored: an error (transformers would start a random head).

    Returns:
      (the config to build, {HF name a rule reads: the stored name to read it from}).

    Raises:
      ValueError: untied without a stored head.
    """
    aliases: dict[str, str] = {}
    if not config.tie_word_embeddings:
        if _HEAD not in files and _EMBED in files:
            raise ValueError(
                "config.json says tie_word_embeddings: false but the checkpoint stores no "
                f"{_HEAD} (transformers would start a random output head). If the head is the "
                "embedding, set tie_word_embeddings: true in config.json; else the download is "
                "incomplete.")
        return config, aliases
    if _HEAD in files and _EMBED not in files:
        aliases[_EMBED] = _HEAD
    elif _HEAD in files and not np.array_equal(_read_tensor(files, _HEAD),
                                               _read_tensor(files, _EMBED)):
        logger.warning(
            "config.json says tie_word_embeddings: true but the checkpoint stores an %s that "
            "differs from the embedding: using the stored head, untied, as transformers does. "
            "Set tie_word_embeddings: false in config.json to silence this.", _HEAD)
        config = config.replace(tie_word_embeddings=False)
    return config, aliases


def _place(x, dtype, sharding):
    x = np.asarray(x).astype(jnp.dtype(dtype)) if dtype is not None else np.asarray(x)
    return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)


def _read_converted(rules, files, config, shapes, aliases=None):
    """Yields ('a/b', numpy value) for every Flax parameter, one HF tensor at a time."""
    handles: dict[pathlib.Path, Any] = {}
    aliases = aliases or {}
    try:
        for rule in rules:
            name = aliases.get(rule.hf, rule.hf)
            fpath = files[name]
            if fpath not in handles:
                handles[fpath] = safe_open(fpath, framework="numpy").__enter__()
            tensor = handles[fpath].get_tensor(name)
            expected = _expected_hf_shape(rule, shapes, config)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"Tensor {rule.hf} has shape {tuple(tensor.shape)} but config.json implies "
                    f"{expected}: the weights belong to a different configuration.")
            for p, v in zip(rule.flax, HOOKS[rule.hook][0](tensor, config), strict=True):
                yield p, np.asarray(v)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def from_pretrained(path, dtype=jnp.float32, shardings=None, **config_overrides):
    """Loads an HF folder (config.json + safetensors) as a `Decoder` and plain-array params.

    Args:
      path: folder with config.json and model.safetensors or model.safetensors.index.json.
      dtype: dtype of the params and of the module's compute (None keeps the stored dtype for the
        params and computes in float32).
      shardings: None (default device), one `jax.sharding.Sharding` for every parameter, or a
        pytree of shardings shaped like the params; each tensor is placed straight into it.
      **config_overrides: `ModelConfig` fields to change, e.g. `scan_layers=True, remat=True`.
        `num_layers=n` (fewer than the checkpoint's) loads only the first n layers (dry runs of
        big teachers); `layer_types` is cut to match.

    Returns:
      (model, params): `model.apply({"params": params}, input_ids)` runs it.

    Raises:
      FileNotFoundError: no config.json / weights, or shard files missing.
      ValueError: unsupported model_type, missing or unexpected tensors, shapes that disagree.
        Where config.json and the stored head disagree, see `_resolve_head` (transformers'
        behaviour, or an error).
    """
    path = pathlib.Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'} does not exist: pass an HF model folder.")
    config = _config_with_overrides(json.loads((path / "config.json").read_text()),
                                    config_overrides)
    files = _weight_files(path)
    config, aliases = _resolve_head(config, files)
    compute = jnp.float32 if dtype is None else dtype
    model = Decoder(config, dtype=compute, param_dtype=compute)
    rules = expand_rules(config)
    _check_names(rules, {**files, **{a: files[b] for a, b in aliases.items()}}, config,
                 config_overrides.get("num_layers"))
    shapes = _flax_shapes(model)
    flat_shardings = _flat_shardings(shardings, config)
    flat = {}
    for key, value in _read_converted(rules, files, config, shapes, aliases):
        if config.scan_layers and key.startswith("layer_"):
            flat[key] = value  # stacked below, then placed
        else:
            flat[key] = _place(value, dtype, flat_shardings(key))
    if config.scan_layers:
        flat = _stack_layers(flat, config, dtype, flat_shardings)
    return model, unflatten_dict(flat, sep="/")


def _config_with_overrides(hf: dict, overrides: dict) -> ModelConfig:
    full = ModelConfig.from_hf(hf)
    overrides = dict(overrides)
    n = overrides.get("num_layers")
    if n is not None:
        if not 1 <= n <= full.num_layers:
            raise ValueError(f"num_layers={n} must be between 1 and the checkpoint's "
                             f"{full.num_layers}.")
        if full.layer_types is not None and "layer_types" not in overrides:
            overrides["layer_types"] = full.layer_types[:n]
    return ModelConfig.from_hf(hf, **overrides)


def _flat_shardings(shardings, config):
    """'a/b' -> the sharding to use (None for the default device)."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return lambda key: shardings
    flat = flatten_dict(unbox(shardings), sep="/")
    return lambda key: flat[key]


def _stack_layers(flat, config, dtype, flat_shardings):
    out = {k: v for k, v in flat.items() if not k.startswith("layer_")}
    suffixes = {k.split("/", 1)[1] for k in flat if k.startswith("layer_0/")}
    for suffix in sorted(suffixes):
        stacked = np.stack([flat.pop(f"layer_{i}/{suffix}") for i in range(config.num_layers)])
        out[f"layers/{suffix}"] = _place(stacked, dtype, flat_shardings(f"layers/{suffix}"))
    return out


def unscan_params(config: ModelConfig, params) -> dict:
    """Scanned params (`layers/...` with a leading layer axis) -> per-layer `layer_{i}/...`."""
    params = unbox(params)
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(config.num_layers):
        out[f"layer_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
    return out


def _hf_tensor(rule, flat, config) -> np.ndarray:
    values = [jnp.asarray(flat[p]) for p in rule.flax]
    return np.ascontiguousarray(np.asarray(HOOKS[rule.hook][1](values, config)))


def _plan_shards(rules, flat, config, max_bytes) -> list[list]:
    """Groups the rules into shards of at most max_bytes (from shapes only: nothing converted)."""
    shards, current, size = [], [], 0
    for rule in rules:
        structs = [jax.ShapeDtypeStruct(flat[p].shape, flat[p].dtype) for p in rule.flax]
        out = jax.eval_shape(lambda ws, rule=rule: HOOKS[rule.hook][1](ws, config), structs)
        nbytes = int(np.prod(out.shape)) * out.dtype.itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(rule)
        size += nbytes
    return shards + [current]


def save_pretrained(model: Decoder, params, path, max_shard_bytes: int = _DEFAULT_SHARD_BYTES):
    """Writes config.json + safetensors that `transformers.AutoModelForCausalLM` loads.

    Args:
      model: the `Decoder` (its config is written as config.json).
      params: its params (plain or boxed, scanned or not), without the {"params": ...} wrapper.
      path: output folder (created).
      max_shard_bytes: above this, the weights are split into model-0000k-of-0000n.safetensors
        files with a model.safetensors.index.json, as transformers does.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    flat = flatten_dict(unscan_params(config, params), sep="/")
    dtype_name = str(jnp.dtype(flat["embed/embedding"].dtype))
    hf = config.to_hf() | {"torch_dtype": dtype_name, "dtype": dtype_name}
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    shards = _plan_shards(expand_rules(config), flat, config, max_shard_bytes)
    # Converted and written one shard at a time: the host holds one shard, not the model.
    if len(shards) == 1:
        tensors = {rule.hf: _hf_tensor(rule, flat, config) for rule in shards[0]}
        save_file(tensors, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {rule.hf: _hf_tensor(rule, flat, config) for rule in shard}
        save_file(tensors, os.fspath(path / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
