"""Benchmark of the TAD loss: custom_vjp vs plain autodiff vs KL, fwd+bwd, time/memory/FLOPs.

Prints one JSON object per (shape, dtype) case:

    python scripts/bench_loss.py                          # the three issue shapes x {f32, bf16}
    python scripts/bench_loss.py --cases 2x128x32000 --dtypes float32 --repeats 3

Goals (issue #2): TAD fwd+bwd <= 1.5 x KL fwd+bwd; custom_vjp <= 0.8 x autodiff in time and in
XLA temporary memory.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from tad_jax import kl_divergence, losses, tad_divergence

DEFAULT_CASES = "8x512x32000,4x512x128256,2x256x256000"
TOP_K, BETA = 10, 2.0


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
    """The library's own forward (same top-K, same reductions), differentiated by autodiff.

    Isolates what the custom_vjp buys: `autodiff_tad` above also differs in its forward.
    """
    st = losses._tad_stats(student_btv, jax.lax.stop_gradient(teacher_btv), TOP_K, 1.0)
    beta_x_b = jax.lax.stop_gradient(losses._beta_x(st["log_alpha_t"], mask_bt, BETA, 1e-6))
    loss_bt = mask_bt * (st["kl1"] + beta_x_b[..., None] * jnp.exp(st["log_alpha_t"]) * st["kl2"])
    return jnp.sum(loss_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def _compile(fn, *args):
    return jax.jit(jax.value_and_grad(fn)).lower(*args).compile()


def _measure(fn, args, repeats):
    """Median ms of fwd+bwd, XLA temp bytes and FLOPs of value_and_grad(fn)."""
    compiled = _compile(fn, *args)
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(1e3 * (time.perf_counter() - start))
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "ms": statistics.median(times),
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "flops": (cost or {}).get("flops"),
    }


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
    for name in methods:
        for key, value in _measure(fns[name], (student, teacher, mask), repeats).items():
            row[f"{name}_{key}"] = value
    _ratios(row)
    return row


def _ratios(row):
    def ratio(a, b):
        if row.get(a) and row.get(b):
            row[f"{a}/{b}".replace("_ms", "").replace("_temp_bytes", "_temp")] = row[a] / row[b]

    ratio("tad_ms", "kl_ms")
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
    args = parser.parse_args()
    for case in args.cases.split(","):
        b, t, v = (int(x) for x in case.lower().split("x"))
        for dtype in args.dtypes.split(","):
            row = run_case(b, t, v, jnp.dtype(dtype), args.repeats, args.methods.split(","))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
