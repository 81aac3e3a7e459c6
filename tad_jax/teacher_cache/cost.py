"""FLOPs per token of the train step with a teacher cache against the online step.

Both steps are lowered on abstract shapes (nothing allocated) and counted as the dry run counts
them (`tad_jax.aot.step_costs`: XLA's cost analysis with every loop's trip count accounted). Big
configs compile with `dry_run.num_layers` cut teachers (the student shrinks in proportion); FLOPs
are affine in the layer count, so two cut sizes give the full model's figure by linear
extrapolation (`flops_cached_vs_online`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from tad_jax import sharding
from tad_jax.builders import abstract_student, abstract_teacher, shared_vocab_size
from tad_jax.run_setup import mesh_context, resolved_config
from tad_jax.teacher_cache.reader import CACHE_KEYS


def abstract_cache_batch(cfg, rows: int, batch_sh, num_samples: int = 16) -> dict:
    """`jax.ShapeDtypeStruct`s of a batch's cache entries (K_max = `loss.top_k`), for compiling
    a cached step without a cache (dry runs)."""
    t, k = cfg.data.seq_len, int(cfg.loss.top_k)
    head_ids, head_logp, log_alpha, entropy, samples = CACHE_KEYS
    shapes = {head_ids: ((rows, t, k), jnp.int32), head_logp: ((rows, t, k), jnp.float32),
              log_alpha: ((rows, t), jnp.float32), entropy: ((rows, t), jnp.float32),
              samples: ((rows, t, num_samples), jnp.int32)}
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
            for name, (shape, dtype) in shapes.items()}


def step_flops_per_token(config, *, cached: bool, num_samples: int = 16) -> float:
    """FLOPs per token of the configured step, online or from a cache of `num_samples` draws
    per token, counted the dry run's way (`tad_jax.aot.step_costs`: loops' trip counts in)."""
    from tad_jax import aot

    cfg = ml_collections.ConfigDict(resolved_config(config).to_dict())
    cfg.data.teacher_cache = "<abstract>" if cached else ""
    mesh = sharding.make_mesh(cfg.mesh)
    with mesh_context(mesh):
        t_model, t_abs, _ = abstract_teacher(cfg, mesh)
        s_model, p_abs, mask = abstract_student(cfg, t_model, t_abs, mesh)
        vocab = shared_vocab_size(cfg, t_model.config, s_model.config)
    models = aot.Models(t_model, t_abs, s_model, p_abs, mask, vocab)
    costs = aot.step_costs(cfg, models, model_flops=False, cache_samples=num_samples)
    return costs.flops / (cfg.data.global_batch_size * cfg.data.seq_len)


def flops_cached_vs_online(config, *, layers=None, num_samples: int = 16) -> dict:
    """Cached vs online FLOPs per token; with `layers=(n1, n2)`, measured at two cut teacher
    sizes and extrapolated linearly to the full teacher (see the module docstring).

    The online step is measured at the config's loss and with `cosine_weight=0` (the objective a
    cache computes: it holds no hidden states).
    """
    from tad_jax.builders import teacher_model_config

    full = teacher_model_config(config, full=True).num_layers
    variants = {"cached": (True, 0.0), "online": (False, 0.0)}
    if config.loss.cosine_weight > 0:
        variants["online_with_cosine"] = (False, float(config.loss.cosine_weight))
    out = {"teacher_layers": full}
    for name, (cached, cosine) in variants.items():
        def measure(n, cached=cached, cosine=cosine):
            cfg = ml_collections.ConfigDict(config.to_dict())
            cfg.dry_run.num_layers = n
            if cosine is not None:
                cfg.loss.cosine_weight = cosine
            return step_flops_per_token(cfg, cached=cached, num_samples=num_samples)

        if layers is None:
            out[name] = measure(config.dry_run.num_layers)
        else:
            (n1, n2) = layers
            f1, f2 = measure(n1), measure(n2)
            out[name] = f1 + (f2 - f1) * (full - n1) / (n2 - n1)
            out[f"{name}_at_{n1}_{n2}_layers"] = (f1, f2)
    out["ratio_cached_vs_online"] = out["cached"] / out["online"]
    return out
