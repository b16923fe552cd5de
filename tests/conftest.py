"""Tests run on 8 emulated CPU devices so that sharded code paths are exercised on a laptop."""

import os
import tempfile

# Tests check numbers, not speed: the lowest XLA optimisation level compiles 3-4x faster on CPU.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax

jax.config.update("jax_num_cpu_devices", 8)
# Many tests compile the same programs from fresh closures: a persistent cache keyed by the
# compiled program makes the repeats free.
jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(tempfile.gettempdir(), f"warm_jax_test_xla_cache_{os.getuid()}"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()
