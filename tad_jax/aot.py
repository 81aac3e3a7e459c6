"""AOT compiles of the train and eval steps on abstract inputs: memory, FLOPs, accumulation.

Public API:
- `Models`: the six things `builders.build_models` / the abstract builders return
- `compile_train_step(config, models, mesh, accum=None)`, `compile_eval_step(config, models,
  mesh)`: `jit(step).lower(abstract inputs).compile()` for the mesh's devices (attached or not)
- `MemorySplit`, `train_memory(config, models, mesh, compiled)`, `eval_memory(...)`: per-device
  bytes
- `step_costs(config, models, accum)`: FLOPs of one optimizer step with every loop counted
- `accum_candidates(config, mesh)`, `choose_grad_accum(config, models, mesh, budget_bytes)`,
  `guess_accum`, `predict_accum`: automatic micro-batching (`opt.grad_accum_steps=0`)

Nothing here allocates device memory: inputs are `jax.ShapeDtypeStruct`s carrying shardings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tad_jax import sharding
from tad_jax.builders import with_shardings
from tad_jax.config import num_steps
from tad_jax.run_setup import eval_chunk_size
from tad_jax.step import (
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    state_shardings,
)

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


class Models(NamedTuple):
    """Both models, their (abstract or real) params, the trainable mask, the shared vocabulary."""

    teacher_model: Any
    teacher_params: Any
    student_model: Any
    student_params: Any
    mask: Any
    vocab: int


def with_accum(config, accum: int, **loss_overrides) -> ml_collections.ConfigDict:
    """A copy of `config` with `opt.grad_accum_steps=accum` (and `loss.*` overrides)."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.opt.grad_accum_steps = int(accum)
    for k, v in loss_overrides.items():
        cfg.loss[k] = v
    return cfg


def _abstract_batch(batch: int, seq_len: int, sh=None) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((batch, seq_len),
                                    jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sh)
            for k in BATCH_KEYS}


def _abstract_train_batch(config, batch: int, sh=None,
                          cache_samples: int = 16) -> dict[str, jax.ShapeDtypeStruct]:
    """The train step's abstract batch: the token arrays, plus the cached teacher's statistics
    (`cache_samples` tail draws per token) when the run reads a teacher cache
    (`data.teacher_cache`: no teacher forward)."""
    out = _abstract_batch(batch, config.data.seq_len, sh)
    if config.data.get("teacher_cache") and not config.data.get("teacher_cache_online"):
        from tad_jax.teacher_cache.cost import abstract_cache_batch

        out.update(abstract_cache_batch(config, batch, sh, cache_samples))
    return out


def _abstract_state(config, models: Models, mesh):
    tx, schedule = make_optimizer(config, num_steps(config))
    state_abs = jax.eval_shape(lambda p: init_state(p, models.mask, tx), models.student_params)
    if mesh is None:
        return state_abs, None, tx, schedule
    param_sh = jax.tree.map(lambda x: x.sharding, models.student_params)
    state_sh = state_shardings(state_abs, param_sh, mesh)
    return with_shardings(state_abs, state_sh), state_sh, tx, schedule


def lower_train_step(config, models: Models, mesh, accum: int | None = None,
                     cache_samples: int = 16):
    """The train step lowered on abstract inputs (`mesh=None`: unsharded, for counting;
    `cache_samples`: tail draws per token of a teacher cache, when the run reads one)."""
    cfg = with_accum(config, config.opt.grad_accum_steps if accum is None else accum)
    state_abs, state_sh, tx, schedule = _abstract_state(cfg, models, mesh)
    step = make_train_step(cfg, models.student_model, models.teacher_model, models.mask, tx,
                           schedule, models.vocab, mesh)
    if mesh is None:
        batch_abs = _abstract_train_batch(cfg, cfg.data.global_batch_size, None, cache_samples)
        teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                               models.teacher_params)
        state_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_abs)
        return jax.jit(step).lower(state_abs, batch_abs, teacher)
    batch_sh = sharding.batch_sharding(mesh)
    teacher_sh = jax.tree.map(lambda x: x.sharding, models.teacher_params)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, teacher_sh),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    batch_abs = _abstract_train_batch(cfg, cfg.data.global_batch_size, batch_sh, cache_samples)
    return jitted.lower(state_abs, batch_abs, models.teacher_params)


def compile_train_step(config, models: Models, mesh, accum: int | None = None):
    """The train step compiled for the mesh's devices (`accum`: micro-batches; None = config's)."""
    return lower_train_step(config, models, mesh, accum).compile(compiler_options(mesh))


def compiler_options(mesh) -> dict[str, Any]:
    """XLA options for compiles on `mesh`'s platform.

    GPU targets compiled without a GPU (jax 0.10.2): XLA's Triton GEMM tiling finds no tile sizes
    for some of Phi-2's / Phi-3's matmuls ("Couldn't find output tile sizes") when no device can
    be queried; cuBLAS GEMMs compile, so Triton GEMMs are switched off for these compiles only.
    """
    platform = mesh.devices.flat[0].platform if mesh is not None else ""
    return {"xla_gpu_enable_triton_gemm": False} if platform in ("gpu", "cuda") else {}


def compile_eval_step(config, models: Models, mesh):
    """The eval step (held-out metrics of one `eval.batch_size` batch) compiled for the mesh."""
    batch_sh = sharding.batch_sharding(mesh)
    param_sh = jax.tree.map(lambda x: x.sharding, models.student_params)
    teacher_sh = jax.tree.map(lambda x: x.sharding, models.teacher_params)
    step = make_eval_step(models.student_model, models.teacher_model, models.vocab,
                          chunk_size=eval_chunk_size(config))
    jitted = jax.jit(step, in_shardings=(param_sh, teacher_sh, batch_sh),
                     out_shardings=sharding.replicated(mesh))
    batch_abs = _abstract_batch(config.eval.batch_size, config.data.seq_len, batch_sh)
    lowered = jitted.lower(models.student_params, models.teacher_params, batch_abs)
    return lowered.compile(compiler_options(mesh))


# ---------------------------------------------------------------------------------------------
# Memory


@dataclasses.dataclass(frozen=True)
class MemorySplit:
    """Per-device bytes of a compiled step.

    The groups of arguments come from the abstract inputs' shard shapes; `temporaries`,
    `outputs` (not aliased with a donated argument) and `code` from XLA's memory analysis.
    `resident` is memory the step does not take as an argument but that stays allocated while it
    runs (the optimizer state during evaluation). `total` is their sum: the peak the step needs.
    """

    student_params: float
    teacher_params: float
    opt_state: float
    batch: float
    temporaries: float
    outputs: float
    code: float
    resident: float = 0.0

    @property
    def total(self) -> float:
        return (self.student_params + self.teacher_params + self.opt_state + self.batch
                + self.temporaries + self.outputs + self.code + self.resident)

    def as_gib(self) -> dict[str, float]:
        d = {k: v / 2.0**30 for k, v in dataclasses.asdict(self).items()}
        d["total"] = self.total / 2.0**30
        return d


def shard_bytes(tree) -> float:
    """Bytes of one device's shards of a tree of `jax.ShapeDtypeStruct` (or arrays)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.shape
        sh = getattr(x, "sharding", None)
        if sh is not None and hasattr(sh, "shard_shape"):
            shape = sh.shard_shape(shape)
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return float(total)


def _analysis(compiled):
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("XLA gave no memory analysis for this compile.")
    return mem


def train_memory(config, models: Models, mesh, compiled, accum: int | None = None) -> MemorySplit:
    """Per-device memory of a compiled train step (see `MemorySplit`)."""
    cfg = with_accum(config, config.opt.grad_accum_steps if accum is None else accum)
    state_abs, _, _, _ = _abstract_state(cfg, models, mesh)
    mem = _analysis(compiled)
    batch = _abstract_train_batch(cfg, cfg.data.global_batch_size, sharding.batch_sharding(mesh))
    return MemorySplit(
        student_params=shard_bytes(state_abs["params"]),
        teacher_params=shard_bytes(models.teacher_params),
        opt_state=shard_bytes((state_abs["opt_state"], state_abs["step"])),
        batch=shard_bytes(batch),
        temporaries=float(mem.temp_size_in_bytes),
        outputs=float(mem.output_size_in_bytes - mem.alias_size_in_bytes),
        code=float(mem.generated_code_size_in_bytes))


def eval_memory(config, models: Models, mesh, compiled) -> MemorySplit:
    """Per-device memory of a compiled eval step, the train state's optimizer moments resident."""
    state_abs, _, _, _ = _abstract_state(config, models, mesh)
    mem = _analysis(compiled)
    batch = _abstract_batch(config.eval.batch_size, config.data.seq_len,
                            sharding.batch_sharding(mesh))
    return MemorySplit(
        student_params=shard_bytes(models.student_params),
        teacher_params=shard_bytes(models.teacher_params), opt_state=0.0,
        batch=shard_bytes(batch), temporaries=float(mem.temp_size_in_bytes),
        outputs=float(mem.output_size_in_bytes), code=float(mem.generated_code_size_in_bytes),
        resident=shard_bytes(state_abs["opt_state"]))


# ---------------------------------------------------------------------------------------------
# FLOPs with every loop counted


@contextlib.contextmanager
def _unrolled_scans():
    """Every `jax.lax.scan` traced inside is fully unrolled (straight-line HLO).

    XLA's cost analysis counts the body of a while loop once, whatever its trip count. Unrolled,
    each iteration is its own code and is counted. Only used to count: the patched function is
    restored on exit, and the unrolled program is lowered, never compiled or run.
    """
    orig = jax.lax.scan

    @functools.wraps(orig)
    def scan(f, init, xs=None, length=None, reverse=False, unroll=1, _split_transpose=False):
        return orig(f, init, xs, length=length, reverse=reverse, unroll=True,
                    _split_transpose=_split_transpose)

    jax.lax.scan = scan
    try:
        yield
    finally:
        jax.lax.scan = orig


class StepCosts(NamedTuple):
    """FLOPs of one optimizer step on the whole (global) batch.

    flops: as executed (rematerialised forward passes included).
    model_flops: without rematerialisation (what MFU counts).
    micro_flops: of one micro-batch, as executed (the measure multiplied by the micro-batches).
    """

    flops: float
    model_flops: float
    micro_flops: float


def step_costs(config, models: Models, accum: int | None = None, *,
               model_flops: bool = True, cache_samples: int = 16) -> StepCosts:
    """FLOPs of one optimizer step, every loop's trip count accounted for.

    Method: XLA counts a while loop's body once, so the step is not measured as compiled. One
    micro-batch (`global_batch_size / accum` sequences, no accumulation scan) is traced with every
    `lax.scan` unrolled (the fused loss's chunk loop, scanned layers), lowered without a mesh and
    measured with XLA's HLO cost analysis of the lowered program (platform independent: the GPU
    compiler gives no cost analysis). The step's FLOPs are `accum` times that: the optimizer
    update, which runs once per step, is then counted `accum` times (about 20 FLOPs per trained
    parameter, < 0.1% of a micro-batch at the paper's sizes). The same without remat gives
    `model_flops` (`model_flops=False`: not measured, reported equal to `flops`).
    """
    accum = int(config.opt.grad_accum_steps if accum is None else accum)
    micro = with_accum(config, 1)
    micro.data.global_batch_size = config.data.global_batch_size // accum

    def measure(cfg, models_):
        with _unrolled_scans():
            lowered = lower_train_step(cfg, models_, None, accum=1, cache_samples=cache_samples)
        return cost_flops(lowered)

    executed = measure(micro, models)
    plain = _without_remat(models) if model_flops else models
    model = executed if plain is models else measure(micro, plain)
    return StepCosts(flops=executed * accum, model_flops=model * accum, micro_flops=executed)


def _without_remat(models: Models) -> Models:
    t, s = models.teacher_model, models.student_model
    if not (t.config.remat or s.config.remat):
        return models
    t = t.clone(config=t.config.replace(remat=False))
    s = s.clone(config=s.config.replace(remat=False))
    return models._replace(teacher_model=t, student_model=s)


def cost_flops(stage) -> float:
    """The "flops" of a lowered or compiled program's cost analysis (NaN when none is given)."""
    cost = stage.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def cost_bytes(stage) -> float:
    """The "bytes accessed" of a compiled program's cost analysis (NaN when none is given)."""
    cost = stage.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost.get("bytes accessed", float("nan"))) if cost else float("nan")


# ---------------------------------------------------------------------------------------------
# Automatic micro-batching


def accum_candidates(config, mesh) -> list[int]:
    """Micro-batch counts that split the batch into whole rows on every batch shard, ascending."""
    per_shard = config.data.global_batch_size // sharding.batch_shards(mesh)
    return [a for a in range(1, per_shard + 1) if per_shard % a == 0]


def guess_accum(split: MemorySplit, accum: int, candidates: list[int], budget_bytes: float):
    """The fewest micro-batches predicted to fit from one compile at `accum`: the temporaries
    scale with the micro-batch's rows (`temporaries · accum / a`), the rest stays."""
    fixed = split.total - split.temporaries
    for a in candidates:
        if fixed + split.temporaries * accum / a <= budget_bytes:
            return a
    return candidates[-1]


class AccumChoice(NamedTuple):
    """The chosen `opt.grad_accum_steps`, its per-device bytes, and every compile's bytes."""

    accum: int
    total_bytes: float
    tried: dict[int, float]
    budget_bytes: float
    fits: bool


def predict_accum(tried: dict[int, float], candidates: list[int], rows: int,
                  budget_bytes: float) -> int | None:
    """The fewest micro-batches an affine model of the compiles made predicts to fit.

    Model: bytes = fixed + per_row · (rows / accum) (the parameters, optimizer state and gathered
    weights stay; activations scale with a micro-batch's rows). It goes through two measured
    points: the nearest fit and the nearest misfit when both exist (interpolation), else the two
    nearest the budget on the one side measured. None: fewer than two points, or a model with
    memory not growing with rows (then the caller bisects).
    """
    fit = sorted((a for a in tried if tried[a] <= budget_bytes), reverse=True)  # most rows last
    miss = sorted(a for a in tried if tried[a] > budget_bytes)  # fewest rows last
    if fit and miss:
        pts = [fit[-1], miss[-1]]
    elif len(fit) >= 2:
        pts = fit[-2:]
    elif len(miss) >= 2:
        pts = miss[-2:]
    else:
        return None
    (r0, m0), (r1, m1) = [(rows / a, tried[a]) for a in pts]
    if r0 == r1 or (m1 - m0) / (r1 - r0) <= 0:
        return None
    per_row = (m1 - m0) / (r1 - r0)
    fixed = m0 - per_row * r0
    for a in candidates:
        if fixed + per_row * rows / a <= budget_bytes:
            return a
    return candidates[-1]


def choose_grad_accum(config, models: Models, mesh, budget_bytes: float,
                      measure: Callable[[int], float] | None = None,
                      known: dict[int, float] | None = None,
                      guess: int | None = None) -> AccumChoice:
    """The smallest micro-batch count whose compiled train step fits `budget_bytes` per device.

    Memory falls as micro-batches shrink. Each compile is a prediction kept strictly inside the
    bracket the compiles so far leave open (the fewest micro-batches known to fit, the most known
    not to): the affine fit of `predict_accum` once two points are measured, else `guess`, else
    the bracket's middle. The search stops when the bracket closes: the chosen count fits and the
    next fewer was compiled and does not (or it is one micro-batch). A prediction that is right
    costs two compiles beyond `known` (the choice, and the next fewer, which the clipping to the
    bracket picks as the next prediction); a wrong one narrows the bracket and refits. E.g.
    `gemma2_9b` from its 16 micro-batches (both models scanned): 2 H100s compile 8 (the guess,
    cautious), 4 and 2, and choose 4; 2 v5p chips compile 4 (the guess), 2 and 1, and choose 2.

    Args:
      budget_bytes: the per-device memory the step may use (capacity less a margin).
      measure: accum -> per-device bytes (default: compile the train step and sum `MemorySplit`).
      known: accum -> per-device bytes already measured (e.g. the configured micro-batches).
      guess: the predicted answer while fewer than two points are known (e.g. `guess_accum`'s
        from the configured compile's split); when it is known to fit, the next fewer is
        compiled (one compile when it does not fit).

    Returns:
      An `AccumChoice`; `fits=False` when even one sequence per shard does not fit (then `accum` is
      the largest candidate). `tried` holds every measurement, `known` ones included.
    """
    if measure is None:
        def measure(a):
            return train_memory(config, models, mesh, compile_train_step(config, models, mesh, a),
                                accum=a).total
    cands = accum_candidates(config, mesh)
    rows = cands[-1]  # rows per batch shard of the whole step (one micro-batch per row)
    tried = {a: t for a, t in (known or {}).items() if a in cands}
    while True:
        fit = [i for i, a in enumerate(cands) if a in tried and tried[a] <= budget_bytes]
        miss = [i for i, a in enumerate(cands) if a in tried and tried[a] > budget_bytes]
        lo = max(miss, default=-1) + 1  # the open bracket: indices lo .. hi
        hi = min(fit, default=len(cands)) - 1
        if lo > hi:
            break
        pred = predict_accum(tried, cands, rows, budget_bytes)
        if pred is None and guess in cands:
            pred = guess
        i = (lo + hi) // 2 if pred is None else min(max(cands.index(pred), lo), hi)
        tried[cands[i]] = measure(cands[i])
    if not fit:
        last = cands[-1]
        return AccumChoice(last, tried[last], tried, budget_bytes, fits=False)
    best = cands[min(fit)]
    return AccumChoice(best, tried[best], tried, budget_bytes, fits=True)
