"""Device mesh, logical-axis rules and the shardings of parameters and batches.

The models name only logical axes (`vocab, embed, heads, kv_heads, head_dim, mlp, layers` for
parameters; `batch, seq, embed, heads, vocab` for activations). This module is the one place that
maps them onto the three mesh axes:

- `data`: pure data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters sharded over their `embed` dimension (ZeRO-3 style);
- `tensor`: tensor parallelism over heads, MLP and vocabulary dimensions.

Batches are split over `data` x `fsdp`. Shapes: `_bt` = [batch, T].
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Rules are tried in order; flax skips a rule whose mesh axis is already used by another dimension
# of the same array, so an activation [batch, seq, embed] keeps `fsdp` on the batch and leaves
# `embed` unsharded, while a weight [embed, mlp] gets `fsdp` on embed.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("seq", None),
    ("layers", None),
)

# Environment variables whose presence means "this process is one of several": the launcher
# (SLURM, Open MPI, a TPU pod, or a hand-set coordinator) expects jax.distributed.initialize().
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves the (data, fsdp, tensor) sizes; one of them may be -1 (= all remaining devices).

    Args:
      mesh_cfg: mapping with integer fields `data`, `fsdp`, `tensor`.
      num_devices: the number of devices the mesh must cover.

    Returns:
      The three sizes, whose product is `num_devices`.

    Raises:
      ValueError: more than one -1, a size < 1, or sizes that do not multiply to `num_devices`.
    """
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    shown = dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {shown}: at most one axis may be -1.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {shown}: sizes must be >= 1 or -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {shown}: {num_devices} devices are not divisible by "
                f"{known}; set --config.mesh.* so that the sizes divide the device count."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {shown} covers {math.prod(sizes)} devices but "
            f"{num_devices} are available; set --config.mesh.data=-1 (or make the product match)."
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over all devices (or `devices`).

    `mesh_cfg.num_devices` > 0 (when present) keeps only the first that many devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = int(mesh_cfg.get("num_devices", 0) or 0)
    if n > len(devices):
        raise ValueError(f"mesh.num_devices={n} but only {len(devices)} devices exist; lower it.")
    devices = devices[:n] if n else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: XLA propagates shardings from the in/out shardings and logical constraints
    # (Explicit axes, jax.make_mesh's default, would make every constraint an assertion).
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        # jax.make_mesh orders devices so that the inner axes sit on fast interconnect.
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def maybe_initialize_distributed(mode: str = "auto", *, init_timeout_s: int = 300,
                                 heartbeat_timeout_s: int = 100) -> bool:
    """Calls `jax.distributed.initialize` when the run spans several processes.

    A coordinator set by hand (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`,
    as `python -m tad_jax.launch` sets them) is passed explicitly, so jax does not probe for a
    cluster; otherwise jax's own detection (SLURM, Open MPI, TPU pods) fills in the values.

    Args:
      mode: "auto" (initialize when the environment names a coordinator, a multi-task SLURM job,
        a multi-process MPI job or a multi-host TPU slice), "on" (always) or "off" (never).
      init_timeout_s: seconds to wait for every process to connect before failing.
      heartbeat_timeout_s: seconds without a heartbeat after which a process counts as dead;
        the coordination service then stops the survivors with an error (a dead peer never
        leaves the others hanging for longer than about this).

    Returns:
      True if `jax.distributed.initialize()` was called.

    Raises:
      ValueError: unknown mode, or a partial hand-set coordinator (the message names the missing
        variable).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mesh.distributed={mode!r}: use 'auto', 'on' or 'off'.")
    if mode == "off" or (mode == "auto" and not _environment_is_multihost()):
        return False
    if jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**_hand_set_coordinator(), initialization_timeout=init_timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
    return True


class PeerFailure(RuntimeError):
    """A cross-process operation failed: another process of the run has most likely died."""


@contextlib.contextmanager
def peer_failures(what: str):
    """Turns a runtime error of a multi-process run into a `PeerFailure` that says what to do.

    When a process dies (SIGKILL, OOM, a lost host), the survivors' next collective fails
    (gloo: "connection reset by peer") or, after `heartbeat_timeout_s`, the coordination service
    stops them; this names the likely cause instead of leaving a bare transport error.

    Args:
      what: what the processes were doing (for the message), e.g. "training".
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        raise PeerFailure(
            f"process {jax.process_index()} of {jax.process_count()}: a cross-process operation "
            f"failed during {what}, most likely because another process of the run died (its "
            "log has the cause). Every process stops; rerun the same command on every host to "
            f"resume from the newest complete checkpoint. The error: {e}") from e


def any_process(flag: bool) -> bool:
    """True when `flag` is True in any process of the run (a collective: every process must call
    it, in the same order). With one process, `flag` itself; no device work."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _hand_set_coordinator() -> dict[str, Any]:
    """The coordinator, process count and index set by hand in the environment ({} if none)."""
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    values = [os.environ.get(n) for n in names]
    if not any(values[1:]):
        return {}  # jax's cluster detection (or JAX_COORDINATOR_ADDRESS alone) decides
    if not all(values):
        missing = [n for n, v in zip(names, values, strict=True) if not v]
        raise ValueError(f"{', '.join(missing)} not set: a hand-set coordinator needs all of "
                         f"{', '.join(names)} (python -m tad_jax.launch sets them).")
    return dict(coordinator_address=values[0], num_processes=int(values[1]),
                process_id=int(values[2]))


def _environment_is_multihost() -> bool:
    env = os.environ
    if any(env.get(k) for k in _MULTIHOST_ENV):
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    # A multi-host TPU slice lists several workers, comma separated. Only a process that may
    # use TPUs counts it: TPU runtime variables left in the environment of a CPU-only process
    # (JAX_PLATFORMS=cpu, as the tests and tad_jax.launch set) say nothing about this run.
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms.lower().split(","):
        return False
    # On a host without TPU metadata, importing jax with libtpu installed may leave a warning
    # sentence in the variable ("WARNING: could not determine TPU worker hostnames ..., please
    # set ..."): host names hold no spaces, so such a value names no workers.
    hosts = [h.strip() for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1 and not any(re.search(r"\s", h) for h in hosts)


def unbox(tree: Any) -> Any:
    """Plain values of boxed params, without applying sharding constraints (safe on abstract
    values and outside jit, where `nn.unbox` would constrain under an active mesh)."""
    from flax.core import meta

    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, meta.AxisMetadata) else x,
        tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def logical_specs(boxed_tree: Any) -> Any:
    """Logical PartitionSpecs of boxed params (e.g. of `jax.eval_shape(model.init, ...)`)."""
    return nn.get_partition_spec(boxed_tree)


def param_shardings(
    boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
) -> Any:
    """NamedShardings for a tree of boxed (logically annotated) abstract or concrete params.

    A dimension whose size does not divide by the mesh axes it maps to is left unsharded (e.g. 2 kv
    heads on a 4-way tensor axis), so every preset works on every mesh.

    Args:
      boxed_tree: params as returned by `model.init` or `jax.eval_shape(model.init, ...)`.
      mesh: the device mesh.
      rules: logical -> mesh axis rules.

    Returns:
      A tree of `NamedSharding` shaped like the unboxed params.
    """
    specs = logical_specs(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    shapes = jax.tree.map(lambda x: x.shape, unbox(boxed_tree))
    return jax.tree.map(
        lambda s, shape: _drop_indivisible(s, shape, mesh),
        shardings,
        shapes,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def _drop_indivisible(sharding: NamedSharding, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        if shape[i] % math.prod(mesh.shape[n] for n in names):
            spec[i] = None
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that puts a full copy on every device (scalars, the step counter)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, T] array: rows split over data x fsdp, the sequence unsharded."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split (the product of the data and fsdp axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(batch_size: int, mesh: Mesh,
                          what: str = "data.global_batch_size") -> None:
    """Raises ValueError when `batch_size` rows cannot be split evenly over data x fsdp, or when
    the batch shards do not split over the processes (see `check_batch_processes`)."""
    n = batch_shards(mesh)
    if batch_size % n:
        raise ValueError(
            f"{what}={batch_size} is not divisible by the {n} batch shards of the mesh "
            f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {n} "
            "or change --config.mesh.*."
        )
    n = jax.process_count()
    check_batch_processes(mesh, {d: d.process_index for d in mesh.devices.flat},
                          n if n > 1 else None)


def check_batch_processes(mesh: Mesh, process_of: dict, num_processes: int | None = None
                          ) -> None:
    """Raises ValueError unless every process holds its own, equal share of the batch's rows.

    Each process feeds `rows / num_processes` rows of its own (`data.to_global_batch`), so a
    shard of rows may live on one process only, and each process must hold the same number of
    shards. Otherwise each process would train on its rows as if they were the whole batch
    (half the batch, wrong metrics), or jax fails at the first step.

    Args:
      mesh: the mesh.
      process_of: the process index of each device of the mesh.
      num_processes: the run's processes (all must hold rows), or None: those of `process_of`.
    """
    rows = batch_shards(mesh)
    owners: dict[int, set[int]] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((rows, 1)).items():
        owners.setdefault(index[0].start or 0, set()).add(process_of[device])
    shared = any(len(p) > 1 for p in owners.values())
    count = num_processes or len(set(process_of.values()))
    held = [sum(p == {i} for p in owners.values()) for i in set(process_of.values())]
    if shared or len(held) != count or len(set(held)) > 1:
        raise ValueError(
            f"the mesh's batch axes (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}) do "
            f"not split over the {count} processes, which each feed an equal share of the rows: "
            "a shard of rows would lie on devices of several processes (in this topology's "
            "device order, e.g. a mesh.tensor group spanning two hosts), or the mesh leaves "
            "some processes fewer devices (mesh.num_devices). Use mesh.fsdp or mesh.data "
            "rather than mesh.tensor across hosts, a smaller mesh.tensor, and every device.")
