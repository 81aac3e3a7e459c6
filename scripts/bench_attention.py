"""Attention memory and traffic on TPU, from ahead-of-time compiles for a TPU topology (no TPU).

Prints one JSON object with, per implementation (xla = before, splash = after; chunked too for
one layer), the per-device figures XLA reports for the compiled program:

- `layer`: one Gemma2-9B attention layer's core (16 query heads, 8 KV heads, head_dim 256,
  soft-cap 50, packed segments), forward + backward w.r.t. q, k, v, at T = 2048 and 8192, on a
  (data 1, fsdp 2, tensor 2) mesh, one sequence per batch shard;
- `model`: Gemma2-9B teacher forward (bf16, 42 layers) + the gemma2_9b config's student
  (14 layers) forward and backward with the fused TAD loss, one micro-batch (8 x 2048) on
  (data 1, fsdp 4, tensor 1), as configs/gemma2_9b.py runs it.

Figures: `temp_bytes` (XLA's temporaries per device), `bytes_accessed` and `flops` (XLA's cost
analysis; a Pallas kernel is opaque to it: its bytes are its operands and results, its FLOPs
zero, so `kernel_flops` adds the splash kernels' matmuls, counted per call from the compiled HLO)
and `roofline_s` = max(FLOPs / peak, bytes / HBM bandwidth) with v5p's 459 TFLOP/s (bf16) and
2.765 TB/s.

  JAX_PLATFORMS=cpu python scripts/bench_attention.py [--what layer,model] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compiles may hold libtpu

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from tad_jax import sharding  # noqa: E402
from tad_jax.fused import fused_tad_loss  # noqa: E402
from tad_jax.models import PRESETS, Decoder, lm_head, student_preset  # noqa: E402
from tad_jax.models import attention as attn  # noqa: E402

PEAK_FLOPS, HBM_BPS = 459e12, 2.765e12  # TPU v5p per chip


def _mesh(topology: str, data: int, fsdp: int, tensor: int):
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    return sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), devices)


def _kernel_flops(hlo: str, seq_len: int, heads_per_call: int, head_dim: int, block: int) -> int:
    """Matmul FLOPs of the splash kernels in `hlo`: per call, fwd 2, dq 3, dkv 4 products of
    [T, E] x [E, T] size over the blocks a causal mask leaves ((n + 1) / 2n of n^2 blocks)."""
    n = seq_len // block
    per_matmul = 2 * seq_len * seq_len * head_dim * heads_per_call * (n + 1) / (2 * n)
    calls = re.findall(r"%splash_mha_(fwd|dq|dkv)\S* = ", hlo)
    return int(sum({"fwd": 2, "dq": 3, "dkv": 4}[c] for c in calls) * per_matmul)


def _figures(compiled, kernel_flops: int = 0) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return dict(temp_bytes=int(mem.temp_size_in_bytes), arg_bytes=int(mem.argument_size_in_bytes),
                bytes_accessed=nbytes, flops=flops, kernel_flops=kernel_flops,
                roofline_s=max((flops + kernel_flops) / PEAK_FLOPS, nbytes / HBM_BPS))


def _segments(b: int, t: int):
    """Three documents per row (the kernel sees segment ids; the XLA path builds [B, T, T])."""
    return (jnp.arange(t)[None] * 3 // t + 1).repeat(b, 0).astype(jnp.int32)


def bench_layer(topology: str, impl: str, seq_len: int) -> dict:
    """One Gemma2-9B attention core, forward + backward, per-device figures."""
    mesh = _mesh(topology, 1, 2, 2)
    cfg = PRESETS["gemma2-9b"].replace(
        attention="chunked" if impl == "chunked" else impl, attn_query_chunk=512)
    b, h, k, e = 2, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    spec = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES, None, "tensor", None))
    q = jax.ShapeDtypeStruct((b, seq_len, h, e), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((b, seq_len, k, e), jnp.bfloat16, sharding=spec)

    def loss(q_, k_, v_):
        seg = _segments(b, seq_len)
        masks = attn.attention_masks(cfg, seg, impl)
        out = attn.attend(impl, cfg, q_, k_, v_, masks, False, jnp.bfloat16)
        return jnp.sum(out.astype(jnp.float32))

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    block = attn.splash_block_size(cfg, seq_len)
    return _figures(compiled, _kernel_flops(compiled.as_text(), seq_len, h // 2, e, block))


def _abstract_params(model: Decoder, mesh):
    ids = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda r: model.init(r, ids)["params"], jax.random.key(0))
    shardings = sharding.param_shardings(boxed, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        sharding.unbox(boxed), shardings)


def _first_layers(cfg, n: int):
    if not n:
        return cfg
    return cfg.replace(num_layers=n, layer_types=cfg.layer_types[:n])


def bench_model(topology: str, impl: str, seq_len: int = 2048, batch: int = 8,
                teacher_layers: int = 0, student_layers: int = 0) -> dict:
    """Teacher forward + student forward/backward (fused TAD loss), per-device figures.
    `*_layers` > 0 keeps only the first layers (quick checks)."""
    mesh = _mesh(topology, 1, 4, 1)
    tcfg = _first_layers(PRESETS["gemma2-9b"].replace(attention=impl), teacher_layers)
    scfg = _first_layers(student_preset("gemma2-9b-student").replace(attention=impl, remat=True),
                         student_layers)
    teacher = Decoder(tcfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    student = Decoder(scfg, dtype=jnp.float32, param_dtype=jnp.float32)
    tparams, sparams = _abstract_params(teacher, mesh), _abstract_params(student, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sh)

    def loss(trained, frozen, tp, ids_bt):
        seg = _segments(batch, seq_len)
        t_out = teacher.apply({"params": tp}, ids_bt, seg, return_logits=False)
        p = {**trained, **frozen}
        s_out = student.apply({"params": p}, ids_bt, seg, return_logits=False)
        return fused_tad_loss(s_out.hidden_states, lm_head(scfg, p)[0],
                              jax.lax.stop_gradient(t_out.hidden_states), lm_head(tcfg, tp)[0],
                              chunk_size=512, final_logit_softcap=scfg.final_logit_softcap)

    trained = {n: v for n, v in sparams.items() if n != "embed"}  # embeddings frozen (config)
    frozen = {"embed": sparams["embed"]}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        compiled = jax.jit(jax.value_and_grad(loss)).lower(trained, frozen, tparams, ids).compile()
    block = attn.splash_block_size(tcfg, seq_len)
    heads = batch // 4 * tcfg.num_heads  # per call: the vmapped rows of one device, all heads
    return _figures(compiled, _kernel_flops(compiled.as_text(), seq_len, heads, tcfg.head_dim,
                                            block))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:2x2x1")
    p.add_argument("--what", default="layer,model", help="comma-separated: layer, model")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--model_seq_lens", default="2048", help="model: comma-separated T values")
    p.add_argument("--teacher_layers", type=int, default=0, help="model: first N layers only")
    p.add_argument("--student_layers", type=int, default=0, help="model: first N layers only")
    args = p.parse_args()
    result = dict(topology=args.topology, teacher_layers=args.teacher_layers or 42,
                  student_layers=args.student_layers or 14, layer={}, model={})
    for what in args.what.split(","):
        for impl in (("xla", "chunked", "splash") if what == "layer" else ("xla", "splash")):
            model_ts = tuple(int(x) for x in args.model_seq_lens.split(","))
            for t in ((2048, 8192) if what == "layer" else model_ts):
                start = time.time()
                fig = bench_layer(args.topology, impl, t) if what == "layer" else bench_model(
                    args.topology, impl, t, teacher_layers=args.teacher_layers,
                    student_layers=args.student_layers)
                fig["compile_s"] = round(time.time() - start, 1)
                result[what][f"{impl}_T{t}"] = fig
                print(json.dumps({what: {f"{impl}_T{t}": fig}}), flush=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
