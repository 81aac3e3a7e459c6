"""Benchmark of tad_jax.fused: XLA temporary memory (compile only) and fwd+bwd time, JSON lines.

    python scripts/bench_fused.py                      # everything (a few minutes on 2 CPU cores)
    python scripts/bench_fused.py --skip_time          # memory only
    python scripts/bench_fused.py --skip_memory --time_tokens 512

TPU: `--tpu` prints a `bench: "tpu_aot"` line: fused TAD vs fused KL fwd+bwd compiled ahead of
time for one TPU v5p chip (run with JAX_PLATFORMS=cpu), bytes accessed, FLOPs and XLA TPU's
cycle estimate (`est_cycles`, TopK excluded; the chunk scans unrolled, as XLA counts a loop body
once) and temporaries (scans rolled), at V = 256000, bf16. A Pallas kernel (`tad_jax.tpu_kernel`,
fused TAD's top-K and pass of sums on TPU) is in `bytes` as its operands read once plus its
results written once (`*_pallas_bytes`, from the HLO shapes: XLA counts 0 bytes for it); its
FLOPs, transcendentals and cycles are in none of the figures (XLA has no estimate for it);
with `chunk_size` tokens per step (rows span chunks: teacher pre-pass) and with whole rows per
step (`*_whole_rows`: no pre-pass, [T, V] logits), the memory vs FLOPs trade-off.
`tad/kl_flops_head_bound`: the head matmuls' ratio of the cheapest exact β(X) with rows that
span chunks (1.34x at these sizes), which the measured `tad/kl_flops` is compared with.

Memory: `jax.jit(grad).lower(ShapeDtypeStruct...).compile().memory_analysis()` of the loss's
gradient w.r.t. the student hidden states and head, head matmuls included, at Gemma2 sizes
(V = 256000, d = 2304 student / 3584 teacher); nothing is allocated. Time: the same gradient run
at CPU-feasible sizes, the best of a few runs after a warm-up.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from tad_jax import fused, losses


def _unfused_grad(div, **kw):
    def loss(hs, ws, ht, wt, mask):
        zs, zt = hs @ ws, ht @ wt
        if div == "tad":
            return losses.tad_divergence(zs, zt, mask, **kw)
        return losses.kl_divergence(zs, zt, mask)

    return jax.grad(loss, argnums=(0, 1))


def _fused_grad(div, chunk_size, head_grad=True, **kw):
    kw = dict(kw, chunk_size=chunk_size, student_head_grad=head_grad)

    def loss(hs, ws, ht, wt, mask):
        if div == "tad":
            return fused.fused_tad_loss(hs, ws, ht, wt, mask, **kw)
        return fused.fused_kl_loss(hs, ws, ht, wt, mask, **kw)

    return jax.grad(loss, argnums=(0, 1) if head_grad else 0)


def _pre_pass_only(chunk_size, top_k):
    """The teacher pre-pass of fused TAD alone (its share of the fused TAD time)."""

    def run(hs, ws, ht, wt, mask):
        tad = fused.core.TADConfig(top_k=top_k)
        cfg = fused._Config("tad", False, tad, chunk_size, None, "mean")
        mask_rt = fused._mask_rt(mask, *mask.shape)
        return fused._pre_pass(cfg, (ws, None, wt, None), ht, mask_rt, None)

    return run


def _shapes(rows, t, ds, dt, vocab, dtype):
    sds = jax.ShapeDtypeStruct
    return (
        sds((rows, t, ds), dtype),
        sds((ds, vocab), dtype),
        sds((rows, t, dt), dtype),
        sds((dt, vocab), dtype),
        sds((rows, t), jnp.float32),
    )


def bench_memory(args):
    """Temporary bytes of fused TAD / KL vs unfused TAD (fwd+bwd) per N; one JSON line per N."""
    for n in args.mem_tokens:
        rows = max(1, n // args.seq_len)
        shapes = _shapes(rows, n // rows, args.d_student, args.d_teacher, args.vocab, jnp.float32)
        rec = dict(
            bench="memory",
            tokens=n,
            rows=rows,
            vocab=args.vocab,
            d_student=args.d_student,
            d_teacher=args.d_teacher,
            chunk_size=args.chunk_size,
            top_k=args.top_k,
        )
        for name, fn in (
            ("fused_tad", _fused_grad("tad", args.chunk_size, top_k=args.top_k)),
            ("fused_kl", _fused_grad("kl", args.chunk_size)),
            ("unfused_tad", _unfused_grad("tad", top_k=args.top_k)),
        ):
            mem = jax.jit(fn).lower(*shapes).compile().memory_analysis()
            rec[f"{name}_temp_bytes"] = int(mem.temp_size_in_bytes)
            rec[f"{name}_output_bytes"] = int(mem.output_size_in_bytes)
        rec["fused_over_unfused"] = rec["fused_tad_temp_bytes"] / rec["unfused_tad_temp_bytes"]
        print(json.dumps(rec), flush=True)


def bench_tpu(args):
    """TPU-AOT FLOPs, bytes and temporaries of fused TAD vs fused KL (fwd+bwd); one JSON line."""
    from bench_loss import tpu_aot_cost

    n, dtype = args.tpu_tokens, jnp.dtype(args.tpu_dtype)
    rows = max(1, n // args.seq_len)
    shapes = _shapes(rows, n // rows, args.d_student, args.d_teacher, args.vocab, dtype)
    rec = dict(bench="tpu_aot", tokens=n, rows=rows, vocab=args.vocab, d_student=args.d_student,
               d_teacher=args.d_teacher, chunk_size=args.chunk_size, top_k=args.top_k,
               dtype=dtype.name)
    whole = n // rows  # chunk_size >= T: whole rows per step, no pre-pass, more logits memory
    for name, fn in (("fused_tad", _fused_grad("tad", args.chunk_size, top_k=args.top_k)),
                     ("fused_kl", _fused_grad("kl", args.chunk_size)),
                     ("fused_tad_whole_rows", _fused_grad("tad", whole, top_k=args.top_k)),
                     ("fused_kl_whole_rows", _fused_grad("kl", whole))):
        rec[f"{name}_temp_bytes"] = tpu_aot_cost(fn, shapes)["temp_bytes"]
        # FLOPs and bytes of every chunk, not of one loop body. jax caches traces by function,
        # not by this module global: without clearing, the rolled trace above would be reused.
        fused._UNROLL = True
        jax.clear_caches()
        try:
            cost = tpu_aot_cost(fn, shapes)
        finally:
            fused._UNROLL = 1
            jax.clear_caches()
        rec.update({f"{name}_{k}": cost[k]
                    for k in ("bytes", "pallas_bytes", "flops", "transcendentals",
                              "est_cycles")})
    for key in ("bytes", "flops", "est_cycles", "temp_bytes"):
        rec[f"tad/kl_{key}"] = rec[f"fused_tad_{key}"] / rec[f"fused_kl_{key}"]
        rec[f"whole_rows_tad/kl_{key}"] = (rec[f"fused_tad_whole_rows_{key}"]
                                           / rec[f"fused_kl_whole_rows_{key}"])
    rec["tad/kl_flops_head_bound"] = head_flops_bound(args.d_student, args.d_teacher)
    rec["whole_rows_tad/kl_bytes_top_k_bound"] = top_k_bytes_bound(
        n, args.vocab, rec["fused_kl_whole_rows_bytes"])
    print(json.dumps(rec), flush=True)


def head_flops_bound(d_s, d_t):
    """Fused TAD / fused KL head-matmul FLOPs of the cheapest exact β(X) when rows span chunks,
    trained head: KL makes 3·d_s + d_t multiply-adds per token and vocabulary entry; a teacher
    pre-pass adds d_t, keeping Eq. 6's two gradient parts apart until β(X) is known adds 2·d_s
    (derivation: docs/fused_loss.md, "FLOPs: is the pre-pass the floor?")."""
    return 1.0 + min(d_t, 2 * d_s) / (3 * d_s + d_t)


def top_k_bytes_bound(tokens, vocab, kl_bytes):
    """Fused TAD / fused KL bytes with whole rows per step when TAD adds only the exact top-K:
    XLA's TopK fuses with nothing, so it reads the teacher's float32 logits once more, N·V·4
    bytes (docs/fused_loss.md, "the student's tail maximum online")."""
    return 1.0 + tokens * vocab * 4 / kl_bytes


def _time_all(fns, inputs, repeats):
    """Best-of-`repeats` wall and process-CPU seconds of each function, runs interleaved.

    On a shared machine the CPU seconds (all threads of this process) are the steadier measure of
    the work done; the wall seconds are what a user waits.
    """
    jitted = {k: jax.jit(f) for k, f in fns.items()}
    for f in jitted.values():
        jax.block_until_ready(f(*inputs))  # compile + warm-up
    best = {}
    for _ in range(repeats):
        for k, f in jitted.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(*inputs))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[k] = min(best.get(k, wall), wall)
            best[k.replace("_s", "_cpu_s")] = min(best.get(k.replace("_s", "_cpu_s"), cpu), cpu)
    return best


def bench_time(args):
    """Fwd+bwd seconds of fused TAD vs unfused TAD and vs fused KL; one JSON line."""
    n, c = args.time_tokens, args.time_chunk_size
    rows = max(1, n // args.time_seq_len)
    ds, dt, v = args.time_d_student, args.time_d_teacher, args.time_vocab
    ks = jax.random.split(jax.random.key(0), 4)
    inputs = (
        jax.random.normal(ks[0], (rows, n // rows, ds)),
        jax.random.normal(ks[1], (ds, v)) / ds**0.5 * 3,
        jax.random.normal(ks[2], (rows, n // rows, dt)),
        jax.random.normal(ks[3], (dt, v)) / dt**0.5 * 4,
        jnp.ones((rows, n // rows)),
    )
    rec = dict(
        bench="time",
        tokens=n,
        rows=rows,
        vocab=v,
        d_student=ds,
        d_teacher=dt,
        chunk_size=c,
        top_k=args.top_k,
        backend=jax.default_backend(),
    )
    runs = {
        "fused_tad_s": _fused_grad("tad", c, top_k=args.top_k),
        "fused_kl_s": _fused_grad("kl", c),
        "unfused_tad_s": _unfused_grad("tad", top_k=args.top_k),
        "unfused_kl_s": _unfused_grad("kl"),
        "fused_tad_pre_pass_s": _pre_pass_only(c, args.top_k),
        # A frozen head (student_head_grad=False): no dW matmul.
        "fused_tad_frozen_head_s": _fused_grad("tad", c, head_grad=False, top_k=args.top_k),
        "fused_kl_frozen_head_s": _fused_grad("kl", c, head_grad=False),
        # chunk_size >= T: whole rows per step, β(X) inside the single pass.
        "fused_tad_whole_rows_s": _fused_grad("tad", n // rows, top_k=args.top_k),
        "fused_kl_whole_rows_s": _fused_grad("kl", n // rows),
    }
    rec.update(_time_all(runs, inputs, args.repeats))
    ratios = {
        "fused_tad_over_unfused_tad": ("fused_tad", "unfused_tad"),
        "fused_tad_over_fused_kl": ("fused_tad", "fused_kl"),
        "pre_pass_share_of_fused_tad": ("fused_tad_pre_pass", "fused_tad"),
        "frozen_head_fused_tad_over_fused_kl": ("fused_tad_frozen_head", "fused_kl_frozen_head"),
        "whole_rows_fused_tad_over_fused_kl": ("fused_tad_whole_rows", "fused_kl_whole_rows"),
    }
    for name, (a, b) in ratios.items():
        rec[name] = rec[f"{a}_s"] / rec[f"{b}_s"]
        rec[name + "_cpu"] = rec[f"{a}_cpu_s"] / rec[f"{b}_cpu_s"]
    print(json.dumps(rec), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mem_tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--seq_len", type=int, default=4096, help="positions per row (memory bench)")
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--d_student", type=int, default=2304)
    p.add_argument("--d_teacher", type=int, default=3584)
    p.add_argument("--chunk_size", type=int, default=512, help="tokens per step (memory bench)")
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--time_tokens", type=int, default=2048)
    p.add_argument("--time_seq_len", type=int, default=1024)
    p.add_argument("--time_vocab", type=int, default=32000)
    p.add_argument("--time_d_student", type=int, default=256)
    p.add_argument("--time_d_teacher", type=int, default=384)
    p.add_argument("--time_chunk_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tpu", action="store_true", help="TPU-AOT fused TAD vs fused KL costs")
    p.add_argument("--tpu_tokens", type=int, default=4096)
    p.add_argument("--tpu_dtype", default="bfloat16")
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--skip_time", action="store_true")
    args = p.parse_args()
    if args.tpu:
        bench_tpu(args)
    if not args.skip_memory:
        bench_memory(args)
    if not args.skip_time:
        bench_time(args)


if __name__ == "__main__":
    main()
