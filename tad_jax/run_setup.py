"""Setting a run up: the resolved config, the mesh, models, state, compiled steps and data.

Public API:
- `setup_run(config, workdir) -> Run`: builds or resumes a run (everything the loop needs)
- `resolved_config(config)`: a copy with derived defaults filled in
- `check_batches(config, mesh)`: batch sizes that split over the mesh and the micro-batches
- `mesh_context(mesh)`: the mesh and logical-axis rules in scope
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import ml_collections

from tad_jax import sharding
from tad_jax.builders import build_models
from tad_jax.checkpoint import Checkpointer, check_same_config, load_data_state
from tad_jax.config import config_to_dict, num_steps, validate_config
from tad_jax.step import (
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    state_shardings,
)

logger = logging.getLogger(__name__)
FUSED_DIVERGENCES = ("tad", "kl")  # the divergences tad_jax.fused implements


class Run:
    """Everything the loop needs, built by `setup_run` (models, state, compiled steps, data)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def resolved_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with derived defaults filled in (data.tokenizer: the student's or teacher's;
    loss.fused: False for divergences without a fused kernel, so that e.g. the paper configs'
    baselines stay one override, --config.loss.divergence=rkl)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.data.tokenizer:
        config.data.tokenizer = config.student.path or config.teacher.path
    if config.loss.divergence not in FUSED_DIVERGENCES:
        config.loss.fused = False
    return config


def check_batches(config, mesh) -> None:
    """Raises unless the train and eval batches split over the mesh's batch shards and the
    train batch over `opt.grad_accum_steps` micro-batches of whole shards.

    Raises:
      ValueError: a batch size that does not divide; the message names the fields to change.
    """
    shards = sharding.batch_shards(mesh)
    sharding.check_batch_divisible(config.data.global_batch_size, mesh)
    sharding.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    accum = config.opt.grad_accum_steps or 1  # 0 (automatic) is resolved later
    if config.data.global_batch_size % (accum * shards):
        raise ValueError(
            f"data.global_batch_size={config.data.global_batch_size} must be divisible by "
            f"opt.grad_accum_steps x batch shards = {accum} x {shards}: each micro-batch is split "
            "over the devices. Change one of them.")


def _compile_steps(config, models, tx, schedule, state_sh, mesh):
    teacher_model, teacher_params, student_model, params, mask, vocab = models
    batch_sh = sharding.batch_sharding(mesh)
    teacher_sh = jax.tree.map(lambda x: x.sharding, teacher_params)
    step = make_train_step(config, student_model, teacher_model, mask, tx, schedule, vocab, mesh)
    step_fn = jax.jit(step, in_shardings=(state_sh, batch_sh, teacher_sh),
                      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(student_model, teacher_model, vocab,
                                     chunk_size=eval_chunk_size(config)),
                      in_shardings=(state_sh["params"], teacher_sh, batch_sh),
                      out_shardings=sharding.replicated(mesh))
    return step_fn, eval_fn, batch_sh


def eval_chunk_size(config) -> int | None:
    """The eval step's token chunks: `loss.chunk_size` when the loss is fused (no [B, T, V]
    logits anywhere in the run), else None (whole logits)."""
    return int(config.loss.chunk_size) if config.loss.fused else None


def setup_run(config, workdir: str) -> Run:
    """Builds or resumes a run: mesh, models, state (restored when `workdir` has a checkpoint),
    compiled steps, the data iterator at the right position, the metrics writer.

    Raises:
      ValueError / FileNotFoundError: bad config, paths, mesh, or a checkpoint of another config.
    """
    validate_config(config)
    config = resolved_config(config)
    sharding.maybe_initialize_distributed(
        config.mesh.distributed, init_timeout_s=config.mesh.init_timeout_s,
        heartbeat_timeout_s=config.mesh.heartbeat_timeout_s)
    mesh = sharding.make_mesh(config.mesh)
    check_batches(config, mesh)
    ckpt = Checkpointer(workdir, keep=config.ckpt.keep, async_save=config.ckpt.async_save)
    latest = ckpt.latest_step()
    if latest is not None:
        check_same_config(ckpt.read_meta(latest)["config"], config_to_dict(config),
                          workdir=workdir, allow_change=config.ckpt.allow_config_change)
    from tad_jax.data import make_train_iterator, restore_iterator_state

    logger.info("Reading the data: %s", config.data.prepared_dir or config.data.train_files)
    if config.data.get("teacher_cache"):  # rows by index with the cached teacher's statistics
        from tad_jax.teacher_cache.reader import make_cached_train_iterator

        data_iter = make_cached_train_iterator(config, seed=config.seed)
    else:
        data_iter = make_train_iterator(config.data, seed=config.seed)  # fails early on bad paths
    check_heldout(config)
    with mesh_context(mesh):
        logger.info("Loading the teacher (%s) and building the student",
                    config.teacher.path or "random init")
        models = build_models(config, mesh)
        if config.data.get("teacher_cache"):
            from tad_jax.teacher_cache.reader import open_cache

            open_cache(config, vocab_size=models[5])  # the loss's vocabulary = the cache's
        total = num_steps(config)
        tx, schedule = make_optimizer(config, total)
        params, mask = models[3], models[4]
        abstract = jax.eval_shape(lambda p: init_state(p, mask, tx), params)
        state_sh = state_shardings(abstract, jax.tree.map(lambda x: x.sharding, params), mesh)
        state = jax.jit(lambda p: init_state(p, mask, tx), out_shardings=state_sh)(params)
        if config.opt.grad_accum_steps == 0:
            config.opt.grad_accum_steps = _auto_accum(config, models, mesh)
        if latest is not None:
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, state_sh)
            logger.info("Resuming from the checkpoint of step %d in %s", latest, workdir)
            state, meta = ckpt.restore(latest, abstract)
            restore_iterator_state(data_iter, load_data_state(
                workdir, latest, jax.process_index(), meta.get("data_state")))
        logger.info("Compiling the training and evaluation steps")
        step_fn, eval_fn, batch_sh = _compile_steps(config, models, tx, schedule, state_sh, mesh)
    return Run(config=config, workdir=workdir, mesh=mesh, models=models, state=state,
               step_fn=step_fn, eval_fn=eval_fn, batch_sh=batch_sh, ckpt=ckpt,
               data_iter=data_iter, start_step=latest or 0, total_steps=total)


def check_heldout(config) -> None:
    """Raises unless this process's held-out split gives a batch: the run evaluates at least at
    its last step, and an empty split found then would cost every step since the last checkpoint.

    Raises:
      ValueError: the split (or this process's shards of it) is empty.
    """
    from tad_jax.data import make_eval_iterator

    n = jax.process_count()
    it = make_eval_iterator(config.data, batch_size=config.eval.batch_size // n, max_batches=1,
                            process_index=jax.process_index(), process_count=n)
    if next(it, None) is None:
        raise ValueError(f"Process {jax.process_index()} has no held-out batch: set "
                         "data.val_files or raise data.val_fraction (or use fewer processes).")


def _auto_accum(config, models, mesh) -> int:
    """`opt.grad_accum_steps=0`: the fewest micro-batches whose compiled step fits the devices'
    memory (`memory_stats()["bytes_limit"]` less `dry_run.memory_margin`); 1 where the devices
    report no limit (CPU)."""
    from tad_jax import aot, targets

    limit = targets.resolve_target("").memory_limit_bytes
    if limit is None:
        print("opt.grad_accum_steps=0: these devices report no memory limit; 1 micro-batch.")
        return 1
    budget = limit * (1.0 - config.dry_run.memory_margin)
    choice = aot.choose_grad_accum(config, aot.Models(*models), mesh, budget)
    tried = ", ".join(f"{a}: {b / 2**30:.1f}" for a, b in sorted(choice.tried.items()))
    print(f"opt.grad_accum_steps=0: {choice.accum} micro-batches ("
          f"{'the fewest that fit' if choice.fits else 'none fits; the most'} "
          f"{budget / 2**30:.1f} GiB per device; GiB by micro-batches: {tried}).")
    return choice.accum


def mesh_context(mesh):
    """Mesh and logical-axis rules in scope, so the models' logical constraints resolve."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
    return stack
