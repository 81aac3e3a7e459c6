"""Dry run: the configured steps compiled for a target on abstract shapes; what a run would cost.

Public API: `dry_run(config, print_fn=print, json_path=None) -> dict`.

The target is this host's devices, or (`dry_run.topology`) a TPU topology or GPUs that are not
attached (`tad_jax.targets`). Reported: parameter counts; the train step's per-device memory split
(student params, teacher params, optimizer state, batch, temporaries, outputs, generated code) and
the eval step's; the chip's capacity and a fit verdict naming a fix; what `opt.grad_accum_steps=0`
would choose; FLOPs per step with every loop counted (`aot.step_costs`), bytes accessed, a roofline
lower bound on the step time, tokens/s, an upper bound on MFU, time and chip-hours for the run's
tokens; FLOPs per token for the configured divergence and vanilla KD (the paper's Table 3 measure).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from tad_jax import aot, sharding, targets
from tad_jax.builders import abstract_student, abstract_teacher, shared_vocab_size
from tad_jax.config import num_steps, validate_config
from tad_jax.models import resolve_attention
from tad_jax.run_setup import check_batches, mesh_context, resolved_config
from tad_jax.step import split_trainable

GIB = 2.0**30


def dry_run(config, *, print_fn: Callable[[str], None] = print,
            json_path: str | None = None) -> dict[str, Any]:
    """Compiles the configured steps for the target on abstract inputs and reports their cost.

    Nothing is loaded or allocated: the teacher's architecture comes from `teacher.path`'s
    config.json or `teacher.preset`. `dry_run.num_layers` shrinks the teacher (and the student in
    proportion) so big models compile quickly.

    Args:
      config: the run config (`dry_run.*` chooses the target and what is reported).
      print_fn: where the report's lines go.
      json_path: also write the figures there as JSON.

    Returns:
      The figures as a dict (also printed).

    Raises:
      ValueError / ImportError: a bad target (`tad_jax.targets.resolve_target`) or config.
    """
    validate_config(config, check_paths=False)
    config = resolved_config(config)
    d = config.dry_run
    target = targets.resolve_target(d.topology, int(config.mesh.num_devices))
    mesh = sharding.make_mesh(config.mesh, devices=list(target.devices))
    configured = int(config.opt.grad_accum_steps)
    check_batches(aot.with_accum(config, configured or 1), mesh)
    f: dict[str, Any] = dict(target=d.topology or "host", platform=target.platform,
                             mesh=dict(mesh.shape), devices=mesh.size)
    with mesh_context(mesh):
        teacher_model, teacher_abs, _ = abstract_teacher(config, mesh)
        student_model, params_abs, mask = abstract_student(config, teacher_model, teacher_abs,
                                                            mesh)
        vocab = shared_vocab_size(config, teacher_model.config, student_model.config)
        models = aot.Models(teacher_model, teacher_abs, student_model, params_abs, mask, vocab)
        sc = student_model.config
        f.update(_param_figures(teacher_abs, params_abs, mask),
                 teacher_layers=teacher_model.config.num_layers,
                 student_layers=sc.num_layers, vocab=vocab,
                 teacher_scan=teacher_model.config.scan_layers, student_scan=sc.scan_layers,
                 student_remat=sc.remat_policy if sc.remat else "off")
        f.update(attention=_attention_figures(config, teacher_model, student_model,
                                              target.platform))
        budget = _budget(config, target)
        f.update(chip=_chip_figures(target), budget_gib=None if budget is None else budget / GIB)
        f.update(_memory_and_accum(config, models, mesh, configured, budget, print_fn))
    accum = f["grad_accum_steps"]
    f.update(_flop_figures(config, models, accum))
    f.update(_roofline(config, target, mesh, f))
    for line in format_figures(f):
        print_fn(line)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(f, fh, indent=1, sort_keys=True, default=str)
    return f


def _attention_figures(config, teacher_model, student_model, platform) -> dict[str, str]:
    """The attention implementation each model runs with on the target's platform."""
    out = {}
    for name, model in (("teacher", teacher_model), ("student", student_model)):
        choice = resolve_attention(model.config, platform, seq_len=config.data.seq_len,
                                   dtype=model.dtype)
        out[name] = choice.impl + (f" ({choice.reason})" if choice.reason else "")
    return out


def _param_figures(teacher_abs, params_abs, mask) -> dict[str, int]:
    size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    train, _ = split_trainable(params_abs, mask)
    return dict(teacher_params=size(teacher_abs), student_params=size(params_abs),
                student_trainable_params=size(train))


def _budget(config, target: targets.Target) -> float | None:
    """Per-device bytes the step may use: the device's memory less `dry_run.memory_margin`."""
    limit = config.dry_run.memory_gib * GIB if config.dry_run.memory_gib > 0 else (
        target.memory_limit_bytes)
    return None if limit is None else limit * (1.0 - config.dry_run.memory_margin)


def _chip_figures(target: targets.Target) -> dict[str, Any] | None:
    if target.chip is None:
        return None
    c = target.chip
    return dict(name=c.name, hbm_gib=c.hbm_gib, peak_tflops=c.peak_tflops, hbm_gbps=c.hbm_gbps,
                devices_per_chip=c.devices_per_chip)


def _memory_and_accum(config, models, mesh, configured, budget, print_fn) -> dict[str, Any]:
    """Compiles the train step (configured micro-batches, or the auto choice) and the eval step."""
    out: dict[str, Any] = {}
    cache: dict[int, tuple[Any, aot.MemorySplit, float]] = {}

    def measure(a: int) -> float:
        if a not in cache:
            t0 = time.perf_counter()
            compiled = aot.compile_train_step(config, models, mesh, a)
            secs = time.perf_counter() - t0
            cache[a] = (compiled, aot.train_memory(config, models, mesh, compiled, accum=a), secs)
            print_fn(f"  compiled the train step with {a} micro-batches in {secs:.1f} s: "
                     f"{cache[a][1].total / GIB:.2f} GiB per device")
        return cache[a][1].total

    if configured:
        measure(configured)
    choice = None
    if budget is not None and (configured == 0 or config.dry_run.auto_accum):
        guess = None
        if configured:  # one compile predicts where to look first
            guess = aot.guess_accum(cache[configured][1], configured,
                                    aot.accum_candidates(config, mesh), budget)
        choice = aot.choose_grad_accum(config, models, mesh, budget, measure=measure,
                                       known={a: c[1].total for a, c in cache.items()},
                                       guess=guess)
        out["auto_accum"] = dict(accum=choice.accum, fits=choice.fits,
                                 tried_gib={a: b / GIB for a, b in sorted(choice.tried.items())},
                                 budget_gib=budget / GIB)
    accum = configured or (choice.accum if choice else 1)
    measure(accum)
    compiled, split, secs = cache[accum]
    out.update(grad_accum_steps=accum, accum_was_auto=configured == 0, compile_s=secs,
               train_memory_gib=split.as_gib(), train_bytes_accessed=aot.cost_bytes(compiled))
    if config.dry_run.eval_step:
        t0 = time.perf_counter()
        ev = aot.compile_eval_step(config, models, mesh)
        out.update(eval_compile_s=time.perf_counter() - t0,
                   eval_memory_gib=aot.eval_memory(config, models, mesh, ev).as_gib())
    peak = max(out["train_memory_gib"]["total"],
               out.get("eval_memory_gib", {}).get("total", 0.0))
    out["peak_gib"] = peak
    if budget is not None:
        out["verdict"] = _verdict(config, peak, budget / GIB, accum, choice)
    return out


def _verdict(config, peak_gib, budget_gib, accum, choice) -> str:
    spare = budget_gib - peak_gib
    margin = f"{config.dry_run.memory_margin:.0%} margin"
    if spare >= 0:
        return (f"fits with {spare:.1f} GiB to spare ({peak_gib:.1f} of {budget_gib:.1f} GiB "
                f"usable per device, {margin})")
    fixes = []
    if choice is not None and choice.fits and choice.accum > accum:
        fixes.append(f"--config.opt.grad_accum_steps={choice.accum} (or 0: automatic)")
    elif choice is None:
        fixes.append("--config.opt.grad_accum_steps=0 (the fewest micro-batches that fit)")
    if not config.loss.fused and config.loss.divergence in ("tad", "kl"):
        fixes.append("--config.loss.fused=True (no [tokens, V] logits)")
    if not config.student.remat:
        fixes.append("--config.student.remat=True")
    elif config.student.get("remat_policy", "nothing_saveable") != "nothing_saveable":
        fixes.append("--config.student.remat_policy=nothing_saveable (the backward pass reruns "
                     "the layers' matmuls instead of keeping their outputs)")
    if not config.teacher.get("scan_layers", False):
        fixes.append("--config.teacher.scan_layers=True (gemma2_9b on 2 v5p chips: 31.7 instead "
                     "of 41.8 GiB)")
    if config.teacher.dtype == "float32":
        fixes.append("--config.teacher.dtype=bfloat16")
    fixes.append("more devices (--config.mesh.num_devices, a larger topology) with "
                 "--config.mesh.fsdp=-1")
    return (f"does not fit by {-spare:.1f} GiB ({peak_gib:.1f} of {budget_gib:.1f} GiB usable "
            f"per device, {margin}) — try: " + "; ".join(fixes))


def _flop_figures(config, models, accum: int) -> dict[str, float]:
    """FLOPs per step and per token for the configured divergence and vanilla KD (Table 3)."""
    tokens = config.data.global_batch_size * config.data.seq_len
    costs = aot.step_costs(config, models, accum)
    kd_cfg = aot.with_accum(config, accum, divergence="kl")
    kd = aot.step_costs(kd_cfg, models, accum, model_flops=False)
    per_tok, kd_per_tok = costs.flops / tokens, kd.flops / tokens
    n = config.dry_run.flops_tokens
    return dict(step_flops=costs.flops, step_model_flops=costs.model_flops,
                flops_per_token=per_tok, kd_flops_per_token=kd_per_tok,
                pflops_for_tokens=per_tok * n / 1e15, kd_pflops_for_tokens=kd_per_tok * n / 1e15,
                flops_ratio_vs_kd=per_tok / kd_per_tok, flops_tokens=n, step_tokens=tokens)


def _roofline(config, target: targets.Target, mesh, f: dict[str, Any]) -> dict[str, Any]:
    """The roofline figures of the compiled step on the target's chip (see `roofline`).

    Bytes per device: XLA's "bytes accessed" of the compiled step where the compiler gives it
    (its loop bodies counted once, so a lower bound), and never less than `weight_bytes`.
    """
    if target.chip is None:
        return {}
    xla = f["train_bytes_accessed"]
    stream = weight_bytes(config, f, mesh.shape["tensor"])
    bytes_dev = max(stream, xla if np.isfinite(xla) else 0.0)
    return roofline(target.chip, f["step_flops"], f["step_model_flops"], bytes_dev, mesh.size,
                    f["step_tokens"], num_steps(config))


def weight_bytes(config, f: dict[str, Any], tensor: int = 1) -> float:
    """Bytes of weights one device reads per step, a lower bound on its HBM traffic: each
    micro-batch runs the teacher forward and the student forward and backward, and every device
    reads every weight it multiplies by (after FSDP's all-gathers; tensor parallelism splits
    them)."""
    size = {"bfloat16": 2, "float16": 2, "float32": 4}
    per_pass = (f["teacher_params"] * size[config.teacher.dtype]
                + 2 * f["student_params"] * size[config.student.param_dtype])
    return f["grad_accum_steps"] * per_pass / tensor


def roofline(chip: targets.Chip, step_flops: float, model_flops: float, bytes_per_device: float,
             devices: int, step_tokens: int, steps: int) -> dict[str, Any]:
    """A lower bound on the step time: max(FLOPs / peak, bytes / HBM bandwidth) per device.

    Args:
      chip: the vendor figures (`targets.CHIPS`).
      step_flops: the step's FLOPs on the whole batch, as executed (remat included); each device
        runs `step_flops / devices` (the batch is split evenly).
      model_flops: the same without rematerialisation (for the MFU bound).
      bytes_per_device: HBM bytes one device reads and writes per step.
      devices: JAX devices of the mesh (a v4 chip counts 2).
      step_tokens: tokens per step; steps: steps of the run.

    Returns:
      step_time_s, bound, tokens_per_s, mfu_upper_bound (model FLOPs / (time x peak)),
      run_steps, run_tokens, run_days, run_chip_hours, bytes_per_device.
    """
    flops_s, bytes_s = targets.per_device_peak(chip)
    t_flops, t_bytes = step_flops / devices / flops_s, bytes_per_device / bytes_s
    step_s = max(t_flops, t_bytes)
    chips = devices / chip.devices_per_chip
    return dict(bytes_per_device=bytes_per_device, step_time_s=step_s,
                bound="compute" if t_flops >= t_bytes else "memory bandwidth",
                tokens_per_s=step_tokens / step_s,
                mfu_upper_bound=model_flops / (step_s * flops_s * devices),
                run_steps=steps, run_tokens=steps * step_tokens,
                run_days=steps * step_s / 86400, run_chip_hours=steps * step_s * chips / 3600)


def format_figures(f: dict[str, Any]) -> list[str]:
    """The report's lines."""
    scan = lambda key: " scanned" if f.get(key) else ""
    lines = [
        f"target {f['target']} ({f['platform']}); mesh {f['mesh']} ({f['devices']} devices); "
        f"teacher {f['teacher_layers']}{scan('teacher_scan')} layers, student "
        f"{f['student_layers']}{scan('student_scan')} layers (remat {f.get('student_remat')})",
        f"parameters: teacher {f['teacher_params']:,}  student {f['student_params']:,}  "
        f"(trainable {f['student_trainable_params']:,})",
        f"attention: teacher {f['attention']['teacher']}, student {f['attention']['student']}",
    ]
    if f["chip"]:
        c = f["chip"]
        lines.append(f"chip {c['name']}: {c['hbm_gib']:.1f} GiB HBM, {c['peak_tflops']:.0f} "
                     f"TFLOP/s bf16 dense, {c['hbm_gbps']:.0f} GB/s (vendor figures)")
    elif f["platform"] == "cpu":
        lines.append("CPU figures: XLA's CPU memory and costs are not what an accelerator needs; "
                     "pass --config.dry_run.topology=v5p:2x2x1 (or h100:2, ...) for those.")
    m = f["train_memory_gib"]
    lines.append(
        f"memory per device: {m['total']:.2f} GiB (train step, {f['grad_accum_steps']} "
        f"micro-batches{' chosen automatically' if f['accum_was_auto'] else ''}: student params "
        f"{m['student_params']:.2f}, teacher params {m['teacher_params']:.2f}, optimizer state "
        f"{m['opt_state']:.2f}, batch {m['batch']:.3f}, temporaries {m['temporaries']:.2f}, "
        f"outputs {m['outputs']:.2f}, code {m['code']:.3f}); compiled in {f['compile_s']:.0f} s")
    if "eval_memory_gib" in f:
        e = f["eval_memory_gib"]
        lines.append(f"eval step: {e['total']:.2f} GiB per device (temporaries "
                     f"{e['temporaries']:.2f}, optimizer state resident {e['resident']:.2f})")
    if "verdict" in f:
        lines.append(f"verdict: {f['verdict']}")
    if "auto_accum" in f:
        a = f["auto_accum"]
        tried = ", ".join(f"{k}: {v:.1f}" for k, v in a["tried_gib"].items())
        why = (f"the fewest micro-batches whose step fits {a['budget_gib']:.1f} GiB"
               if a["fits"] else f"none fits {a['budget_gib']:.1f} GiB; the most")
        lines.append(f"opt.grad_accum_steps=0 would choose {a['accum']} ({why}; GiB per device "
                     f"by micro-batches: {tried})")
    lines += [
        f"FLOPs per step: {f['step_flops']:.4g} (every loop counted; without remat "
        f"{f['step_model_flops']:.4g})",
        f"FLOPs per token: {f['flops_per_token']:.4g} (vanilla KD {f['kd_flops_per_token']:.4g}, "
        f"ratio {f['flops_ratio_vs_kd']:.4f})",
        f"PFLOPs for {f['flops_tokens']:,} tokens: {f['pflops_for_tokens']:.3f} "
        f"(vanilla KD {f['kd_pflops_for_tokens']:.3f})",
    ]
    if "step_time_s" in f:
        lines += [
            f"roofline step time >= {f['step_time_s']:.3f} s ({f['bound']} bound; "
            f"{f['bytes_per_device'] / 1e9:.1f} GB accessed per device): <= "
            f"{f['tokens_per_s']:,.0f} tokens/s, MFU <= {f['mfu_upper_bound']:.0%}",
            f"run of {f['run_tokens']:,} tokens ({f['run_steps']:,} steps): >= "
            f"{f['run_days']:.2f} days, {f['run_chip_hours']:,.0f} chip-hours",
        ]
    return lines
