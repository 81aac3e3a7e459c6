"""Shared by the tests of training (test_train, test_step, test_dry_run): configs/tiny.py on one
device, its models and one batch, and the loss of a batch written without the step's machinery.

Runs use configs/tiny.py (a random 2-layer Llama teacher, a 1-layer student, a slice of a real
corpus, a locally trained tokenizer): seconds per run on one CPU core.
"""

import os
import sys

import jax.numpy as jnp

from tad_jax import builders, losses, run_setup, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402

# The environment of the scripts the tests run in fresh processes.
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def tiny_config(**changes):
    """configs/tiny.py on one device, without a progress bar; `changes` use dotted names."""
    cfg = tiny.get_config()
    cfg.log.progress = False
    cfg.mesh.num_devices = 1
    for dotted, value in changes.items():
        *groups, leaf = dotted.split(".")
        node = cfg
        for g in groups:
            node = node[g]
        node[leaf] = value
    return cfg


def models_and_batch(cfg):
    """(resolved config, `builders.build_models` of it, the first training batch)."""
    mesh = sharding.make_mesh(cfg.mesh)
    cfg = run_setup.resolved_config(cfg)
    with run_setup.mesh_context(mesh):
        models = builders.build_models(cfg, mesh)
    from tad_jax.data import make_train_iterator

    batch = {k: jnp.asarray(v) for k, v in next(make_train_iterator(cfg.data, seed=0)).items()}
    return cfg, models, batch


def reference_loss(params, teacher_model, teacher_params, student_model, batch, vocab):
    """The mean Eq. 4 loss of the whole batch, written without the step's machinery."""
    kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    t = teacher_model.apply({"params": teacher_params}, batch["input_ids"], **kw).logits
    s = student_model.apply({"params": params}, batch["input_ids"], **kw).logits
    total, _ = losses.distillation_loss(s[..., :vocab], t[..., :vocab], batch["targets"],
                                        batch["loss_mask"], divergence="tad", top_k=10, beta=2.0)
    return total
