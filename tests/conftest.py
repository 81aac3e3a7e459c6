"""Test setup shared by every test module.

Eight fake CPU devices let the sharding tests run a real mesh on one machine. XLA reads the flag
once, when jax is first imported, so it must be set here, before any test module imports jax.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never reach for the Hugging Face Hub: every model and tokenizer in the tests is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests/conftest.py must run before jax is imported elsewhere"


@pytest.fixture
def x64():
    """float64 on for one test, restored afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)
