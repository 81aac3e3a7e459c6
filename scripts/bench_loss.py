"""Benchmark of the TAD loss: custom_vjp vs plain autodiff vs KL, fwd+bwd, time/memory/FLOPs.

Prints one JSON object per (shape, dtype) case:

    python scripts/bench_loss.py                          # CPU times + TPU-AOT costs
    python scripts/bench_loss.py --cases 2x128x32000 --dtypes float32 --repeats 3
    JAX_PLATFORMS=cpu python scripts/bench_loss.py --skip_time   # TPU-AOT costs only

CPU: fwd+bwd time (median and min of the repeats; the methods timed interleaved, so host load
drifts over all alike), XLA temporaries and FLOPs of each method, run on this host.
TPU: `jax.grad` of TAD and KL compiled ahead of time for one TPU v5p chip (libtpu; nothing runs,
nothing is allocated), `bench: "tpu_aot"` lines with bytes accessed, FLOPs, transcendentals,
XLA TPU's cycle estimate (`est_cycles`, TopK and Pallas kernels excluded) and temporaries at
the accelerator shapes (`--tpu_cases`), and TAD/KL ratios; a Pallas kernel's HBM bytes are
added to XLA's "bytes accessed", which counts none of them (`pallas_bytes`). "tad"/"kl" are the
default calls, "tad_finite"/"kl_finite" those with `student_padding=False` (the training step's).
GPU (`--gpu_target h100:1`, needs tad_jax[gpu-aot]): `bench: "gpu_aot"` lines, temporaries only.

Goals: TPU TAD/KL bytes <= 1.5x; TAD temporaries <= 25% of one f32 [N, V] tensor; CPU TAD/KL
fwd+bwd <= 1.3x at V = 32000 and <= 1.5x at 128K/256K.
"""

import argparse
import functools
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp

from tad_jax import kl_divergence, tad_divergence
from tad_jax import tad_core as core

DEFAULT_CASES = "8x512x32000,4x512x128256,2x256x256000"
TPU_CASES = "1x4096x32000,1x2048x128256,1x1024x256000"
TOP_K, BETA = 10, 2.0


def tpu_aot_cost(fn, args, topology="v5p:2x2x1"):
    """Bytes accessed, FLOPs, transcendentals and temporaries of `fn` compiled for one device of
    `topology` (a `tad_jax.targets` name: a TPU topology, or `h100:1` etc., whose compile gives
    temporaries only: XLA GPU has no cost analysis).

    `args` are `jax.ShapeDtypeStruct`s; they are placed (replicated) on a one-device mesh and
    `jax.jit(fn).lower(...).compile()` runs the target's compiler on this host (set
    JAX_PLATFORMS=cpu: no accelerator is needed). XLA counts a while/scan body once: callers
    unroll their loops for FLOPs and bytes (see bench_fused.py).
    """
    mesh = jax.sharding.Mesh(_devices(topology)[:1], ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in args]
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    kernel_bytes = pallas_bytes(hlo)
    xla_bytes = cost.get("bytes accessed")
    if xla_bytes is None and kernel_bytes:  # (a program of custom calls alone has no such key)
        xla_bytes = 0.0
    return {"bytes": None if xla_bytes is None else xla_bytes + kernel_bytes,
            "pallas_bytes": kernel_bytes, "flops": cost.get("flops"),
            "transcendentals": cost.get("transcendentals"),
            "est_cycles": estimated_cycles(hlo),
            "temp_bytes": int(mem.temp_size_in_bytes)}


_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def pallas_bytes(hlo_text):
    """HBM bytes of the Pallas (Mosaic) kernels of a compiled TPU program: for every
    `tpu_custom_call` instruction, its operands' bytes (read once) plus its results' (written
    once), from the shapes in the HLO text.

    XLA TPU's cost analysis counts 0 for such a call in "bytes accessed" (measured: a program
    of one pallas_call reading [1024, 4096] f32 and writing [1024, 128] has no "bytes accessed"
    at all, only per-operand keys such as "bytes accessed0{}"; with a fusion after it, "bytes
    accessed" is the fusion's alone), so `tpu_aot_cost` adds this. "Read once" is what
    `tad_jax.tpu_kernel`'s BlockSpecs do (each row block visited once, whole rows); a kernel
    whose index maps revisit blocks would need its own count. Like XLA's, one count per
    instruction: a loop body's call counts once (unroll loops, as for FLOPs).
    """
    total = 0
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        results = line.split("=", 1)[1].split("custom-call(", 1)[0]
        operands = re.search(r"operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}", line)
        if operands is None:
            raise ValueError(f"no operand shapes in a tpu_custom_call: {line[:300]}")
        for text in (results, operands.group(1)):
            for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
                size = 1
                for d in filter(None, dims.split(",")):
                    size *= int(d)
                total += size * _ITEM_BYTES[dtype]
    return total


def estimated_cycles(hlo_text):
    """The sum of XLA TPU's per-op cycle estimates (`estimated_cycles` in each op's backend
    config) over the entry computation of a compiled program, or None (no estimates: GPU).

    It ranks programs where bytes do not: the fused loss is bound by its matmuls, and an
    elementwise-heavy formulation can move fewer bytes yet take more cycles. Not counted:
    custom calls (TopK and Pallas kernels carry no estimate: ~1 cycle per 1.6 bytes of their
    input at v5p's bandwidth) and the bodies of loops (unroll them, as for FLOPs).
    """
    start = hlo_text.find("\nENTRY")
    found = re.findall(r'"estimated_cycles":"(\d+)"', hlo_text[start:]) if start >= 0 else []
    return sum(map(int, found)) or None


@functools.cache
def _devices(topology):
    from tad_jax import targets

    return targets.resolve_target(topology).devices


def run_tpu_case(b, t, v, dtype, topology="v5p:2x2x1"):
    """AOT costs of jax.grad of TAD and KL (mean over positions) at one shape, for one device of
    `topology` (TPU: bytes, FLOPs and temporaries; GPU: temporaries)."""
    sds = jax.ShapeDtypeStruct
    args = (sds((b, t, v), dtype), sds((b, t, v), dtype), sds((b, t), jnp.float32))
    # "tad"/"kl": the default (a student -inf entry dropped from both sides); "tad_finite" /
    # "kl_finite": student_padding=False, as the training step calls them (finite student logits).
    fns = {"tad": lambda s, te, m: tad_divergence(s, te, m, top_k=TOP_K, beta=BETA),
           "kl": lambda s, te, m: kl_divergence(s, te, m),
           "tad_finite": lambda s, te, m: tad_divergence(s, te, m, top_k=TOP_K, beta=BETA,
                                                         student_padding=False),
           "kl_finite": lambda s, te, m: kl_divergence(s, te, m, student_padding=False)}
    row = {"bench": "tpu_aot" if topology.startswith("v") else "gpu_aot", "target": topology,
           "B": b, "T": t, "V": v, "dtype": jnp.dtype(dtype).name,
           "top_k": TOP_K, "f32_nv_bytes": 4 * b * t * v}
    for name, fn in fns.items():
        for key, value in tpu_aot_cost(jax.grad(fn), args, topology).items():
            row[f"{name}_{key}"] = value
    for key in ("bytes", "flops", "est_cycles", "temp_bytes"):
        if row[f"tad_{key}"] is not None:
            row[f"tad/kl_{key}"] = row[f"tad_{key}"] / max(row[f"kl_{key}"], 1)
            row[f"tad_finite/kl_finite_{key}"] = (row[f"tad_finite_{key}"]
                                                  / max(row[f"kl_finite_{key}"], 1))
    for name in ("tad", "tad_finite"):
        row[f"{name}_temp/f32_nv"] = row[f"{name}_temp_bytes"] / row["f32_nv_bytes"]
    return row


def autodiff_tad(student_btv, teacher_btv, mask_bt):
    """TAD = KL + (β(X) − 1)·α_T·D_KL2 (spec's gradient form) in log space, for jax.grad.

    The same formula and the same top-K membership construction as the library, but the
    backward pass is whatever autodiff makes of it.
    """
    s_btv = student_btv.astype(jnp.float32)
    t_btv = jax.lax.stop_gradient(teacher_btv.astype(jnp.float32))
    lps_btv = jax.nn.log_softmax(s_btv)
    lpt_btv = jax.nn.log_softmax(t_btv)
    pt_btv = jnp.exp(lpt_btv)
    kl_bt = jnp.sum(pt_btv * (lpt_btv - lps_btv), -1)
    idx_btk = jax.lax.top_k(t_btv, TOP_K)[1]
    iota_v = jnp.arange(s_btv.shape[-1])
    in_top = jnp.any(idx_btk[..., :, None] == iota_v, axis=-2)
    ls_tail_bt = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, s_btv), -1)
    lt_tail_bt = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, t_btv), -1)
    log_alpha_t = lt_tail_bt - jax.nn.logsumexp(t_btv, -1)
    ptt_btv = jnp.exp(t_btv - lt_tail_bt[..., None])
    diff_btv = (t_btv - lt_tail_bt[..., None]) - (s_btv - ls_tail_bt[..., None])
    kl2_bt = jnp.sum(jnp.where(in_top, 0.0, ptt_btv * diff_btv), -1)
    alpha_t = jnp.exp(log_alpha_t)
    mean_alpha_b = jnp.sum(mask_bt * alpha_t, -1) / jnp.maximum(jnp.sum(mask_bt, -1), 1.0)
    beta_x_b = jax.lax.stop_gradient(BETA / jnp.maximum(mean_alpha_b, 1e-6))
    loss_bt = mask_bt * (kl_bt + (beta_x_b[..., None] - 1.0) * alpha_t * kl2_bt)
    return jnp.sum(loss_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def autodiff_own_forward(student_btv, teacher_btv, mask_bt):
    """The library's own forward (the tad_core kernel), differentiated by autodiff.

    Isolates what the custom_vjp buys: `autodiff_tad` above also differs in its forward.
    """
    cfg = core.TADConfig(TOP_K, BETA)
    a_btv, b_btv = core.tempered_pair(student_btv, jax.lax.stop_gradient(teacher_btv), 1.0)
    terms = core.head_and_terms(a_btv, b_btv, TOP_K)[1]
    beta_bt = jax.lax.stop_gradient(core.beta_x(terms.log_alpha_t, mask_bt, cfg))
    loss_bt = mask_bt * (terms.kl1 + beta_bt * jnp.exp(terms.log_alpha_t) * terms.kl2)
    return jnp.sum(loss_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def _compile(fn, *args):
    return jax.jit(jax.value_and_grad(fn)).lower(*args).compile()


def _measure(fns, args, repeats):
    """fwd+bwd of value_and_grad(fn) for each fn: median and min ms, XLA temp bytes and FLOPs.

    The functions are timed interleaved (each repeat runs every one once), so that the load of a
    shared host drifts over all of them alike and their ratios stay comparable.
    """
    compiled = {name: _compile(fn, *args) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for run in range(repeats + 1):  # run 0 is the warm-up
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            if run:
                times[name].append(1e3 * (time.perf_counter() - start))
    out = {}
    for name, fn in compiled.items():
        mem, cost = fn.memory_analysis(), fn.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        out[name] = {"ms": statistics.median(times[name]), "min_ms": min(times[name]),
                     "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
                     "flops": (cost or {}).get("flops")}
    return out


def run_case(b, t, v, dtype, repeats, methods):
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    student = (3.0 * jax.random.normal(keys[0], (b, t, v), jnp.float32)).astype(dtype)
    teacher = (3.0 * jax.random.normal(keys[1], (b, t, v), jnp.float32)).astype(dtype)
    mask = jnp.ones((b, t), jnp.float32)
    fns = {
        "tad": lambda s, te, m: tad_divergence(s, te, m, top_k=TOP_K, beta=BETA),
        "autodiff": autodiff_tad,
        "autodiff_own": autodiff_own_forward,
        "kl": lambda s, te, m: kl_divergence(s, te, m),
    }
    row = {"B": b, "T": t, "V": v, "dtype": jnp.dtype(dtype).name, "top_k": TOP_K,
           "backend": jax.default_backend()}
    measured = _measure({name: fns[name] for name in methods}, (student, teacher, mask), repeats)
    for name, values in measured.items():
        for key, value in values.items():
            row[f"{name}_{key}"] = value
    _ratios(row)
    return row


def _ratios(row):
    def ratio(a, b):
        if row.get(a) and row.get(b):
            row[f"{a}/{b}".replace("_ms", "").replace("_temp_bytes", "_temp")] = row[a] / row[b]

    ratio("tad_ms", "kl_ms")
    ratio("tad_min_ms", "kl_min_ms")
    ratio("tad_ms", "autodiff_ms")
    ratio("tad_ms", "autodiff_own_ms")
    ratio("tad_temp_bytes", "autodiff_own_temp_bytes")
    ratio("tad_temp_bytes", "autodiff_temp_bytes")
    ratio("tad_temp_bytes", "kl_temp_bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma list of BxTxV")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of dtypes")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per function")
    parser.add_argument("--methods", default="tad,autodiff,kl",
                        help="subset of tad,autodiff,autodiff_own,kl")
    parser.add_argument("--tpu_cases", default=TPU_CASES, help="comma list of BxTxV for TPU AOT")
    parser.add_argument("--gpu_target", default="",
                        help="also compile for this GPU (e.g. h100:1; needs tad_jax[gpu-aot]): "
                             "temporaries")
    parser.add_argument("--skip_time", action="store_true", help="TPU-AOT costs only")
    parser.add_argument("--skip_tpu", action="store_true", help="CPU times only")
    args = parser.parse_args()
    if not args.skip_tpu:
        for case in args.tpu_cases.split(","):
            b, t, v = (int(x) for x in case.lower().split("x"))
            for dtype in args.dtypes.split(","):
                print(json.dumps(run_tpu_case(b, t, v, jnp.dtype(dtype))), flush=True)
                if args.gpu_target:
                    row = run_tpu_case(b, t, v, jnp.dtype(dtype), args.gpu_target)
                    print(json.dumps(row), flush=True)
    if args.skip_time:
        return
    for case in args.cases.split(","):
        b, t, v = (int(x) for x in case.lower().split("x"))
        for dtype in args.dtypes.split(","):
            row = run_case(b, t, v, jnp.dtype(dtype), args.repeats, args.methods.split(","))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
