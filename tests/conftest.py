"""Shared set-up: the platform the suite runs on, the GPU tests' gate, tiny configs.

The suite runs on the CPU (six simulated devices for the placement tests)
even where a CUDA build of JAX is installed, so its numbers are the CPU's.
`MINIGPT_TEST_GPU=1` (`make test-gpu`, which also selects `-m gpu`) leaves
the platform to JAX, so the tests marked `gpu` run on the GPU; without it
they are skipped, and so they are where JAX finds no GPU.
"""

import os

GPU_RUN = os.environ.get("MINIGPT_TEST_GPU", "") not in ("", "0")
if not GPU_RUN:
    # must be set before JAX starts; inherited by the scripts the tests start
    os.environ["JAX_PLATFORMS"] = "cpu"
# Six simulated CPU devices for the device-placement tests; must be set before JAX starts.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "6")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the session, inherited by the scripts the
# tests start: the same tiny step compiles once, not once per subprocess.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="minigpt-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # noqa: E402

from minigpt_jax.config import Config  # noqa: E402


def _jax_gpus() -> list:
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this install, or no GPU on this machine
        return []


# Modules whose tests start run.py as a subprocess or train several experiments: `slow`, so
# `make test-fast` (-m "not slow") leaves them out. Single slow tests elsewhere carry the mark.
SLOW_MODULES = {"test_reliability", "test_run", "test_sweeps", "test_parallel", "test_stack",
                "test_gpu_check"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    # the marker, not item.keywords: those hold every parent node's name (a checkout in a folder
    # named gpu would mark every test)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    if not GPU_RUN:
        reason = "a GPU test: run `make test-gpu` (MINIGPT_TEST_GPU=1) on a machine with a GPU"
    elif not _jax_gpus():
        reason = "MINIGPT_TEST_GPU is set but JAX sees no GPU (is jax[cuda12] installed?)"
    else:
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def float32_matmuls():
    """float32 matmuls on every platform: JAX's default on NVIDIA GPUs is TF32, whose
    10-bit mantissa cannot meet the 1e-5 parity bounds."""
    import jax

    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture
def tiny() -> Config:
    """A model small enough for seconds-long tests (the vocabulary stays GPT-2's)."""
    return Config(embed_dim=32, n_heads=2, n_layers=2, seq_len=32, batch_size=4, dropout=0.0)
