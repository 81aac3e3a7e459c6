"""Dry run: the configured step compiled on abstract shapes, and what it would cost.

Public API: `dry_run(config, print_fn=print) -> dict` (parameter counts, per-device memory,
FLOPs per token, TAD vs vanilla-KD FLOPs: the paper's Table 3 measure).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tad_jax import sharding
from tad_jax.builders import abstract_student, abstract_teacher, shared_vocab_size, with_shardings
from tad_jax.config import num_steps, validate_config
from tad_jax.run_setup import check_batches, mesh_context, resolved_config
from tad_jax.step import (
    init_state,
    make_optimizer,
    make_train_step,
    split_trainable,
    state_shardings,
)


def dry_run(config, *, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Compiles the configured step on abstract shapes and reports what it would cost.

    Nothing is loaded or allocated: the teacher's architecture comes from `teacher.path`'s
    config.json or `teacher.preset`. Reported: parameter counts, per-device memory of the step
    (XLA memory analysis), FLOPs per token (XLA cost analysis of one micro-batch) for the
    configured divergence and for vanilla KD, and both for `dry_run.flops_tokens` tokens (the
    paper's Table 3 measure). `dry_run.num_layers` shrinks the teacher (and the student in
    proportion) so big models compile on small hosts.

    Returns:
      The figures as a dict (also printed).
    """
    validate_config(config, check_paths=False)
    config = resolved_config(config)
    mesh = sharding.make_mesh(config.mesh)
    check_batches(config, mesh)
    with mesh_context(mesh):
        teacher_model, teacher_abs, _ = abstract_teacher(config, mesh)
        student_model, params_abs, mask = abstract_student(config, teacher_model, teacher_abs,
                                                            mesh)
        vocab = shared_vocab_size(config, teacher_model.config, student_model.config)
        figures = _param_figures(teacher_abs, params_abs, mask)
        figures.update(mesh=dict(mesh.shape), devices=mesh.size,
                       teacher_layers=teacher_model.config.num_layers,
                       student_layers=student_model.config.num_layers)
        models = (teacher_model, teacher_abs, student_model, params_abs, mask, vocab)
        compiled = _compile_abstract(config, models, mesh)
        figures.update(_memory_figures(compiled))
        figures.update(_flop_figures(config, models, mesh, compiled))
    for line in _format_figures(figures):
        print_fn(line)
    return figures


def _param_figures(teacher_abs, params_abs, mask) -> dict[str, int]:
    size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    train, _ = split_trainable(params_abs, mask)
    return dict(teacher_params=size(teacher_abs), student_params=size(params_abs),
                student_trainable_params=size(train))


def _compile_abstract(config, models, mesh, divergence=None, micro_only=False):
    """The step compiled on abstract inputs (optionally: another divergence, one micro-batch)."""
    teacher_model, teacher_abs, student_model, params_abs, mask, vocab = models
    cfg = ml_collections.ConfigDict(config.to_dict())
    batch = cfg.data.global_batch_size
    if divergence:
        cfg.loss.divergence = divergence
    if micro_only:
        batch //= cfg.opt.grad_accum_steps
        cfg.opt.grad_accum_steps = 1
    tx, schedule = make_optimizer(cfg, num_steps(cfg))
    state_abs = jax.eval_shape(lambda p: init_state(p, mask, tx), params_abs)
    state_sh = state_shardings(state_abs, jax.tree.map(lambda x: x.sharding, params_abs), mesh)
    state_abs = with_shardings(state_abs, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch_abs = {k: jax.ShapeDtypeStruct((batch, cfg.data.seq_len),
                                         jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=batch_sh) for k in _BATCH_KEYS}
    if cfg.data.get("teacher_cache") and not cfg.data.get("teacher_cache_online"):
        from tad_jax.teacher_cache.cost import abstract_cache_batch

        batch_abs.update(abstract_cache_batch(cfg, batch, batch_sh))  # no teacher forward
    step = make_train_step(cfg, student_model, teacher_model, mask, tx, schedule, vocab, mesh)
    teacher_sh = jax.tree.map(lambda x: x.sharding, teacher_abs)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, teacher_sh),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    return jitted.lower(state_abs, batch_abs, teacher_abs).compile()


_BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


def _memory_figures(compiled) -> dict[str, float]:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    gib = 2.0**30
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    return dict(mem_arguments_gib=args / gib, mem_outputs_gib=out / gib, mem_temp_gib=temp / gib,
                mem_per_device_gib=(args + out - alias + temp) / gib)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def _flop_figures(config, models, mesh, compiled) -> dict[str, float]:
    """FLOPs of one micro-batch (XLA counts a scan's body once, so the step is not measured
    with accumulation), per token and for `dry_run.flops_tokens` tokens, TAD vs vanilla KD.
    """
    accum = config.opt.grad_accum_steps
    tokens = config.data.global_batch_size // accum * config.data.seq_len
    main = compiled if accum == 1 else _compile_abstract(config, models, mesh, micro_only=True)
    kd = _compile_abstract(config, models, mesh, divergence="kl", micro_only=True)
    # cost_analysis reports the FLOPs of one device's program; the step runs on every device.
    per_tok = _flops(main) * mesh.size / tokens
    kd_per_tok = _flops(kd) * mesh.size / tokens
    n = config.dry_run.flops_tokens
    return dict(flops_per_token=per_tok, kd_flops_per_token=kd_per_tok,
                pflops_for_tokens=per_tok * n / 1e15, kd_pflops_for_tokens=kd_per_tok * n / 1e15,
                flops_ratio_vs_kd=per_tok / kd_per_tok, flops_tokens=n)


def _format_figures(f: dict[str, Any]) -> list[str]:
    lines = [
        f"mesh {f['mesh']} ({f['devices']} devices); teacher {f['teacher_layers']} layers, "
        f"student {f['student_layers']} layers",
        f"parameters: teacher {f['teacher_params']:,}  student {f['student_params']:,}  "
        f"(trainable {f['student_trainable_params']:,})",
    ]
    if "mem_per_device_gib" in f:
        lines.append(
            f"memory per device: {f['mem_per_device_gib']:.2f} GiB (arguments "
            f"{f['mem_arguments_gib']:.2f}, outputs {f['mem_outputs_gib']:.2f}, temporaries "
            f"{f['mem_temp_gib']:.2f})")
    lines += [
        f"FLOPs per token: {f['flops_per_token']:.4g} (vanilla KD {f['kd_flops_per_token']:.4g}, "
        f"ratio {f['flops_ratio_vs_kd']:.4f})",
        f"PFLOPs for {f['flops_tokens']:,} tokens: {f['pflops_for_tokens']:.3f} "
        f"(vanilla KD {f['kd_pflops_for_tokens']:.3f})",
    ]
    return lines
