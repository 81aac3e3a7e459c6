"""Tests of tad_jax.sharding: mesh sizes, logical-axis rules, param and batch shardings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tad_jax import sharding
from tad_jax.models import Decoder, ModelConfig

TINY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                   num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("cfg, expected", [
    (dict(data=-1, fsdp=1, tensor=1), (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
    (dict(data=1, fsdp=2, tensor=4), (1, 2, 4)),
])
def test_mesh_shape_fills_the_free_axis(cfg, expected):
    assert sharding.mesh_shape(cfg, 8) == expected
    mesh = sharding.make_mesh(cfg)
    assert tuple(mesh.shape[a] for a in sharding.MESH_AXES) == expected


@pytest.mark.parametrize("cfg, match", [
    (dict(data=2, fsdp=2, tensor=1), "covers 4 devices but 8"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one axis"),
    (dict(data=3, fsdp=-1, tensor=1), "not divisible"),
    (dict(data=0, fsdp=1, tensor=1), ">= 1 or -1"),
])
def test_mesh_mismatch_is_a_clear_error(cfg, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(cfg)


def test_num_devices_takes_a_prefix_of_the_devices():
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, num_devices=2))
    assert list(mesh.devices.flat) == jax.devices()[:2]
    with pytest.raises(ValueError, match="num_devices=9"):
        sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, num_devices=9))


def _boxed_params():
    model = Decoder(TINY)
    return jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 4), jnp.int32))["params"],
                          jax.random.key(0))


def test_param_shardings_follow_the_rules():
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
    boxed = _boxed_params()
    shardings = sharding.param_shardings(boxed, mesh)
    specs = nn.get_partition_spec(boxed)
    flat_sh = jax.tree_util.tree_leaves_with_path(shardings)
    flat_spec = dict(jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, P)))
    shapes = dict(jax.tree_util.tree_leaves_with_path(sharding.unbox(boxed)))
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    assert flat_sh, "no parameters"
    for path, s in flat_sh:
        logical, shape = flat_spec[path], shapes[path].shape
        for dim, (name, mesh_axes) in enumerate(zip(logical, s.spec, strict=False)):
            want = rules.get(name)
            size = np.prod([mesh.shape[a] for a in ((want,) if isinstance(want, str) else
                                                    (want or ()))])
            # Each dim gets its rule's mesh axis, or None when the size does not divide.
            assert mesh_axes == (want if shape[dim] % size == 0 else None), (path, logical)


def test_indivisible_dims_are_replicated():
    # 2 kv heads cannot be split 4 ways: the kv projection keeps that dim whole.
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
    shardings = sharding.param_shardings(_boxed_params(), mesh)
    k_spec = shardings["layer_0"]["attn"]["k"]["kernel"].spec
    q_spec = shardings["layer_0"]["attn"]["q"]["kernel"].spec
    assert "tensor" in tuple(q_spec) and "tensor" not in tuple(k_spec)


def test_batch_sharding_splits_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    s = sharding.batch_sharding(mesh)
    x = jax.device_put(np.arange(8 * 3).reshape(8, 3), s)
    assert {sh.data.shape for sh in x.addressable_shards} == {(2, 3)}
    assert sharding.batch_shards(mesh) == 4
    sharding.check_batch_divisible(8, mesh)
    with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
        sharding.check_batch_divisible(6, mesh)


@pytest.mark.parametrize("cfg, interleaved, ok", [
    (dict(data=2, fsdp=2, tensor=2), False, True),  # tensor pairs inside a process
    (dict(data=1, fsdp=2, tensor=4), False, True),
    (dict(data=-1, fsdp=1, tensor=1), True, True),
    (dict(data=1, fsdp=1, tensor=-1), False, False),  # one shard of rows on both processes
    (dict(data=4, fsdp=1, tensor=2), True, False),  # each tensor pair spans the processes
])
def test_a_batch_shard_on_two_processes_is_refused(cfg, interleaved, ok):
    # Two processes of 4 devices each: the mesh's first 4 devices, or every other one. A
    # reviewer's finding: with tensor parallelism across processes each process trained on its
    # rows as if they were the whole batch.
    mesh = sharding.make_mesh(cfg, jax.devices())
    process_of = {d: i % 2 if interleaved else i // 4 for i, d in enumerate(mesh.devices.flat)}
    if ok:
        sharding.check_batch_processes(mesh, process_of)
    else:
        with pytest.raises(ValueError, match="do not split over the 2 processes"):
            sharding.check_batch_processes(mesh, process_of)


@pytest.mark.parametrize("num_devices", [4, 6])
def test_a_mesh_over_part_of_the_processes_devices_is_refused(num_devices):
    # 2 processes of 4 devices; a mesh over 4 (all of process 0) or 6 (4 + 2) devices gives the
    # processes unequal shares of the rows, while each feeds half the batch.
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, num_devices=num_devices))
    process_of = {d: i // 4 for i, d in enumerate(jax.devices())}
    with pytest.raises(ValueError, match="do not split over the 2 processes"):
        sharding.check_batch_processes(mesh, process_of, num_processes=2)
    full = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    sharding.check_batch_processes(full, process_of, num_processes=2)


def test_distributed_init_only_when_the_environment_says_so(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert not sharding.maybe_initialize_distributed("auto") and not calls
    assert not sharding.maybe_initialize_distributed("off")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding.maybe_initialize_distributed("auto") and len(calls) == 1
    assert "coordinator_address" not in calls[0]  # jax's SLURM detection fills it in
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-a,host-b")
    monkeypatch.setenv("JAX_PLATFORMS", "")
    assert sharding.maybe_initialize_distributed("auto") and len(calls) == 2
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        sharding.maybe_initialize_distributed("yes")


def test_tpu_variables_do_not_make_a_cpu_process_multihost(monkeypatch):
    # TPU runtime variables left in a CPU-only process's environment say nothing about the run.
    for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-a,host-b")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not sharding.maybe_initialize_distributed("auto") and not calls
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert sharding.maybe_initialize_distributed("auto") and len(calls) == 1


def test_hand_set_coordinator_is_passed_explicitly(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b,c")  # ignored: the hand-set values win
    assert sharding.maybe_initialize_distributed("auto", heartbeat_timeout_s=7)
    assert calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
                          initialization_timeout=300, heartbeat_timeout_seconds=7)]
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID not set"):
        sharding.maybe_initialize_distributed("auto")


def test_libtpu_warning_in_tpu_worker_hostnames_is_not_a_multihost_slice(monkeypatch):
    # What importing jax with libtpu installed leaves on a host without TPU metadata.
    for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine TPU worker hostnames "
                       "or IP addresses, please set env var `TPU_WORKER_HOSTNAMES` manually, "
                       "otherwise libtpu.so may not properly initialize.")
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
    assert not sharding.maybe_initialize_distributed("auto") and not calls
