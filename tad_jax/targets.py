"""Compile targets: the host's devices, or accelerators that are not attached (TPUs, GPUs).

Public API:
- `Chip`: one accelerator's vendor figures (HBM capacity and bandwidth, dense bf16 peak).
- `CHIPS`: the chip table (each figure's vendor source in a comment).
- `Target`: what a dry run compiles for (devices, platform, chip, per-device memory budget).
- `resolve_target(name, num_devices=0) -> Target`: `""` = the host's devices; `v5p:2x2x1`,
  `v5e:2x2`, `v6e:2x4`, `v4:2x2x1` ... = a TPU topology (needs `libtpu`:
  `pip install 'tad_jax[tpu]'`); `h100:2`, `a100-80g:8`, `h200:8` = GPUs described by the
  `GpuTargetConfig` files in `tad_jax/gpu_targets/` (needs jax's CUDA plugin:
  `pip install 'tad_jax[gpu-aot]'`).

Nothing here allocates on a device: topology devices are compile-only (jax.experimental.topologies).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any

import jax

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Vendor figures of one accelerator chip.

    Attributes:
      name: a short name (`v5p`, `h100`, ...).
      hbm_gib: memory capacity in GiB (2**30 bytes).
      peak_tflops: dense bf16 peak, 1e12 FLOP/s (no structured sparsity).
      hbm_gbps: memory bandwidth, 1e9 bytes/s.
      devices_per_chip: JAX devices one chip shows in a compile-only topology (v4: its two
        TensorCores), so per-device figures are the chip's divided by this.
    """

    name: str
    hbm_gib: float
    peak_tflops: float
    hbm_gbps: float
    devices_per_chip: int = 1


# Vendor figures. TPUs: Google Cloud TPU documentation, "System architecture" page of each version
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), table "key specifications": peak bf16 compute
# per chip, HBM capacity and bandwidth. Google's "GB" of HBM are binary (a v5p's 95 GB shows as
# 95 GiB in jax's memory_stats()["bytes_limit"]). GPUs: NVIDIA datasheets (SXM parts), dense bf16
# Tensor Core peak (the datasheets' headline figures assume 2:4 sparsity: half of it).
CHIPS: dict[str, Chip] = {
    # TPU v4: 275 TFLOPs bf16, 32 GiB HBM2 at 1200 GBps; libtpu shows its 2 TensorCores.
    "v4": Chip("v4", 32.0, 275.0, 1200.0, devices_per_chip=2),
    # TPU v5e: 197 TFLOPs bf16, 16 GB HBM2 at 819 GBps.
    "v5e": Chip("v5e", 16.0, 197.0, 819.0),
    # TPU v5p: 459 TFLOPs bf16, 95 GB HBM2e at 2765 GBps.
    "v5p": Chip("v5p", 95.0, 459.0, 2765.0),
    # TPU v6e (Trillium): 918 TFLOPs bf16, 32 GB HBM at 1640 GBps.
    "v6e": Chip("v6e", 32.0, 918.0, 1640.0),
    # H100 SXM5: 989 TFLOPs dense bf16 (1,979 with sparsity), 80 GB HBM3 (81559 MiB) at 3.35 TB/s.
    "h100": Chip("h100", 81559 / 1024, 989.0, 3350.0),
    # A100 SXM4 80GB: 312 TFLOPs bf16 (624 with sparsity), 80 GB HBM2e (81920 MiB) at 2039 GB/s.
    "a100-80g": Chip("a100-80g", 80.0, 312.0, 2039.0),
    # H200 SXM: 989 TFLOPs dense bf16, 141 GB HBM3e (143771 MiB) at 4.8 TB/s.
    "h200": Chip("h200", 143771 / 1024, 989.0, 4800.0),
}

TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
GPU_CHIPS = ("h100", "a100-80g", "h200")
# jax's device_kind -> chip name (real devices, and the compile-only ones of a topology).
_DEVICE_KINDS = {
    "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
    "TPU v6 lite": "v6e", "TPU v6e": "v6e", "NVIDIA H100 80GB HBM3": "h100",
    "NVIDIA H100": "h100", "NVIDIA A100-SXM4-80GB": "a100-80g", "NVIDIA H200": "h200",
}
_DEFAULT_HOST_BOUNDS = (2, 2, 1)  # libtpu's default chips per host: smaller topologies pass theirs


@dataclasses.dataclass(frozen=True)
class Target:
    """What a dry run compiles for.

    Attributes:
      name: the topology name as given (`""` = the host's devices).
      platform: "tpu", "cuda" or the host's platform ("cpu" on a CPU-only host).
      devices: the devices the mesh may use (compile-only ones for a topology).
      chip: the chip's vendor figures, or None (a CPU, or an accelerator not in `CHIPS`).
      memory_limit_bytes: per-device memory the step may use: `memory_stats()["bytes_limit"]` on
        an attached accelerator, the chip table's capacity for a topology, None if unknown.
      attached: whether the devices are this host's (the step could run here).
    """

    name: str
    platform: str
    devices: tuple[Any, ...]
    chip: Chip | None
    memory_limit_bytes: float | None
    attached: bool

    @property
    def is_accelerator(self) -> bool:
        return self.platform in ("tpu", "cuda", "gpu", "rocm")


def resolve_target(name: str = "", num_devices: int = 0) -> Target:
    """The devices and chip figures of `name` (see the module docstring for the names).

    Args:
      name: `""` (host), `KIND:AxBxC` (TPU topology, KIND in `TPU_CHIPS`) or `KIND:N` (N GPUs,
        KIND in `GPU_CHIPS`).
      num_devices: > 0: the mesh will use only this many of the devices (checked here).

    Raises:
      ValueError: an unknown name, or `num_devices` larger than the target.
      ImportError: the compiler the target needs is not installed (the message says how).
    """
    if not name:
        target = _host_target()
    else:
        kind, _, shape = name.partition(":")
        kind = kind.strip().lower()
        if kind in TPU_CHIPS:
            target = _tpu_target(name, kind, shape)
        elif kind in GPU_CHIPS:
            target = _gpu_target(name, kind, shape)
        else:
            raise ValueError(
                f"dry_run.topology={name!r}: unknown kind {kind!r}; use a TPU topology "
                f"({', '.join(k + ':...' for k in TPU_CHIPS)}, e.g. v5p:2x2x1) or GPUs "
                f"({', '.join(k + ':N' for k in GPU_CHIPS)}, e.g. h100:2).")
    if num_devices > len(target.devices):
        where = f"dry_run.topology={name!r}" if name else "this host"
        raise ValueError(
            f"mesh.num_devices={num_devices} but {where} has only {len(target.devices)} devices; "
            "lower --config.mesh.num_devices or pick a larger topology (e.g. v5p:2x2x2, h100:8).")
    return target


def _host_target() -> Target:
    devices = tuple(jax.devices())
    d = devices[0]
    chip = CHIPS.get(_DEVICE_KINDS.get(d.device_kind, ""))
    limit = None
    try:
        stats = d.memory_stats()
        limit = float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
    except Exception:  # noqa: BLE001 -- CPU and some plugins do not implement memory_stats
        limit = None
    return Target("", d.platform, devices, chip, limit, attached=True)


def _tpu_target(name: str, kind: str, shape: str) -> Target:
    dims = _parse_dims(name, shape, (2, 3))
    if not has_module("libtpu"):
        raise ImportError(
            f"dry_run.topology={name!r} compiles with libtpu, which is not installed: "
            f"pip install 'tad_jax[tpu]' (or pip install 'jax[tpu]=={jax.__version__}').")
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant for processes that drive real
    # chips; compile-only topologies drive none, so concurrent dry runs and tests may share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {}
    dims3 = dims + (1,) * (3 - len(dims))
    pairs = list(zip(dims3, _DEFAULT_HOST_BOUNDS, strict=True))
    if any(d % b for d, b in pairs) and all(d <= b for d, b in pairs):
        # Smaller than one host's default 2x2x1 chips: the whole topology is one host.
        kwargs["chips_per_host_bounds"] = dims3
    try:
        topo = topologies.get_topology_desc(
            topology_name=f"{kind}:{'x'.join(map(str, dims))}", platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 -- libtpu raises a JaxRuntimeError with its reason
        raise ValueError(
            f"dry_run.topology={name!r}: libtpu rejects it ({str(e).splitlines()[0]}). Use a "
            f"shape {kind} comes in, e.g. {_EXAMPLES[kind]}.") from e
    chip = CHIPS[kind]
    return Target(name, "tpu", tuple(topo.devices), chip,
                  chip.hbm_gib * GIB / chip.devices_per_chip, attached=False)


_EXAMPLES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x4"}


def _gpu_target(name: str, kind: str, shape: str) -> Target:
    (count,) = _parse_dims(name, shape, (1,))
    if not has_module("jax_plugins.xla_cuda12"):
        raise ImportError(
            f"dry_run.topology={name!r} compiles with jax's CUDA plugin, which is not installed "
            "(no GPU is needed): pip install 'tad_jax[gpu-aot]'.")
    from jax.experimental import topologies

    path = os.path.join(os.path.dirname(__file__), "gpu_targets", f"{kind}.txtpb")
    with open(path) as f:
        text = f.read()
    topo = topologies.get_topology_desc(platform="cuda", topology_name="cuda",
                                        target_config=text, topology=f"1x1x{count}")
    chip = CHIPS[kind]
    return Target(name, "cuda", tuple(topo.devices), chip, chip.hbm_gib * GIB, attached=False)


def has_module(name: str) -> bool:
    """Whether `name` (dotted) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _parse_dims(name: str, shape: str, allowed: tuple[int, ...]) -> tuple[int, ...]:
    if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)*", shape) or len(shape.split("x")) not in allowed:
        form = "N (a device count)" if allowed == (1,) else "AxB or AxBxC (chips per axis)"
        raise ValueError(f"dry_run.topology={name!r}: after the kind give {form}, e.g. "
                         f"{'h100:2' if allowed == (1,) else 'v5p:2x2x1'}.")
    return tuple(int(x) for x in shape.split("x"))


def chip_table() -> list[dict[str, Any]]:
    """The chip table as rows (for reports): name, HBM GiB, bf16 TFLOP/s, HBM GB/s."""
    return [dict(chip=c.name, hbm_gib=c.hbm_gib, peak_tflops=c.peak_tflops, hbm_gbps=c.hbm_gbps)
            for c in CHIPS.values()]


def per_device_peak(chip: Chip) -> tuple[float, float]:
    """(FLOP/s, bytes/s) of one JAX device of `chip` (a v4 topology device is half a chip)."""
    n = chip.devices_per_chip
    return chip.peak_tflops * 1e12 / n, chip.hbm_gbps * 1e9 / n
