"""Tests of tad_jax.targets: TPU topologies and GPU targets compiled for on a CPU-only host."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tad_jax import targets

HAS_LIBTPU = targets.has_module("libtpu")
HAS_CUDA_PLUGIN = targets.has_module("jax_plugins.xla_cuda12")
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed: pip install 'tad_jax[tpu]' (the test extra "
    "brings it)")
needs_cuda_plugin = pytest.mark.skipif(
    not HAS_CUDA_PLUGIN, reason="jax's CUDA plugin is not installed (pip install "
    "'tad_jax[gpu-aot]', ~0.5 GB; CI leaves it out)")


def _compile_matmul(devices):
    """A sharded [n*128, 256] @ [256, 512] compiled for `devices`; its memory analysis."""
    mesh = Mesh(np.asarray(devices), ("x",))
    x = jax.ShapeDtypeStruct((len(devices) * 128, 256), jnp.bfloat16,
                             sharding=NamedSharding(mesh, PartitionSpec("x")))
    w = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16,
                             sharding=NamedSharding(mesh, PartitionSpec()))
    return jax.jit(lambda a, b: a @ b).lower(x, w).compile().memory_analysis()


@needs_libtpu
@pytest.mark.parametrize("name, n, kind", [("v5p:2x2x1", 4, "v5p"), ("v5e:2x2", 4, "v5e"),
                                           ("v6e:2x4", 8, "v6e"), ("v4:2x2x1", 8, "v4"),
                                           ("v5e:1x1", 1, "v5e"), ("v5p:2x1x1", 2, "v5p")])
def test_tpu_topologies_give_compile_only_devices(name, n, kind):
    t = targets.resolve_target(name)
    assert (t.platform, len(t.devices), t.chip.name, t.attached) == ("tpu", n, kind, False)
    chip = targets.CHIPS[kind]
    assert t.memory_limit_bytes == chip.hbm_gib * 2**30 / chip.devices_per_chip
    # One [128, 256] bf16 shard and the replicated [256, 512] bf16 weight per device.
    mem = _compile_matmul(t.devices)
    assert mem.argument_size_in_bytes == 128 * 256 * 2 + 256 * 512 * 2


@needs_libtpu
def test_mesh_may_take_a_subset_of_a_topology():
    assert len(targets.resolve_target("v5p:2x2x1", num_devices=2).devices) == 4
    with pytest.raises(ValueError, match=r"mesh.num_devices=8 .* only 4 devices.*v5p:2x2x2"):
        targets.resolve_target("v5p:2x2x1", num_devices=8)


@pytest.mark.parametrize("name, message", [
    ("v9z:2x2", r"unknown kind 'v9z'.*v5p:2x2x1.*h100:2"),
    ("v5p:two", r"after the kind give AxB or AxBxC"),
    ("h100:2x2", r"after the kind give N"),
    ("h100", r"after the kind give N"),
])
def test_bad_topology_names_say_what_to_write(name, message):
    with pytest.raises(ValueError, match=message):
        targets.resolve_target(name)


@needs_libtpu
def test_a_shape_libtpu_rejects_names_a_valid_one():
    with pytest.raises(ValueError, match=r"libtpu rejects it.*e\.g\. v5p:2x2x1"):
        targets.resolve_target("v5p:3x3x3")


@pytest.mark.parametrize("name, module, fix", [("v5p:2x2x1", "libtpu", "tad_jax[tpu]"),
                                               ("h100:1", "jax_plugins.xla_cuda12",
                                                "tad_jax[gpu-aot]")])
def test_a_missing_compiler_names_the_extra_to_install(monkeypatch, name, module, fix):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda m, *a: None if m == module else real(m, *a))
    with pytest.raises(ImportError, match=r"not installed.*pip install '" + re.escape(fix)):
        targets.resolve_target(name)


def test_host_target_is_the_attached_devices():
    t = targets.resolve_target("")
    assert t.attached and t.platform == "cpu" and t.chip is None
    assert len(t.devices) == jax.device_count() and t.memory_limit_bytes is None


@needs_cuda_plugin
@pytest.mark.parametrize("name, kind", [("h100:2", "NVIDIA H100 80GB HBM3"),
                                        ("a100-80g:1", "NVIDIA A100-SXM4-80GB"),
                                        ("h200:1", "NVIDIA H200")])
def test_gpu_targets_from_the_shipped_target_configs(name, kind):
    t = targets.resolve_target(name)
    assert t.platform == "cuda" and len(t.devices) == int(name.split(":")[1])
    assert t.devices[0].device_kind == kind
    mem = _compile_matmul(t.devices)
    assert mem.argument_size_in_bytes == 128 * 256 * 2 + 256 * 512 * 2


def test_chip_table_has_the_vendor_figures():
    # Spot checks against the vendors' pages (see the comments in tad_jax/targets.py).
    c = targets.CHIPS
    assert (c["v5p"].peak_tflops, c["v5p"].hbm_gib, c["v5p"].hbm_gbps) == (459.0, 95.0, 2765.0)
    assert (c["h100"].peak_tflops, c["h100"].hbm_gbps) == (989.0, 3350.0)
    assert targets.per_device_peak(c["v4"]) == (137.5e12, 600e9)  # a v4 device is one core
