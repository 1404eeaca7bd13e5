"""Shared set-up: the platform the suite runs on, the GPU tests' gate, tiny configs, and the
helpers that run the checkout's scripts (REPO, TINY, run_script, start_script, load_script).

The suite runs on the CPU (six simulated devices for the placement tests)
even where a CUDA build of JAX is installed, so its numbers are the CPU's.
`MINIGPT_TEST_GPU=1` (`make test-gpu`, which also selects `-m gpu`) leaves
the platform to JAX, so the tests marked `gpu` run on the GPU; without it
they are skipped, and so they are where JAX finds no GPU.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

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

REPO = pathlib.Path(__file__).resolve().parents[1]  # the checkout under test
# The subprocess tests' model: small enough for seconds-long runs (the vocabulary stays GPT-2's)
TINY_MODEL = {"embed_dim": 32, "n_heads": 2, "seq_len": 32, "batch_size": 4}


def tiny_args(**fields) -> list[str]:
    """run.py's --set arguments for TINY_MODEL with fields added or replaced:
    tiny_args(eval_every=2) -> ["--set", "embed_dim=32", ..., "--set", "eval_every=2"]."""
    return [a for k, v in {**TINY_MODEL, **fields}.items() for a in ("--set", f"{k}={v}")]


# The run tests' arguments: an evaluation and a checkpoint every 2 steps
TINY = tiny_args(eval_every=2, ckpt_every=2)


def script_command(script: str, *args) -> list[str]:
    """The command that runs script: a file of scripts/ ("run.py") or, without ".py", a module
    run with -m from REPO ("benchmarks.gpu_check"); args become strings."""
    target = [str(REPO / "scripts" / script)] if script.endswith(".py") else ["-m", script]
    return [sys.executable, *target, *map(str, args)]


def script_env(devices: int | None = None, **variables) -> dict:
    """This process's environment for a child: REPO first on PYTHONPATH, so the child imports
    the checkout's code even where the installed package points elsewhere; devices simulated
    CPU devices (default: inherited, 6); variables added."""
    env = {**os.environ, **variables}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if devices is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


def run_script(script: str, *args, devices: int | None = None, timeout: float = 900,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run script (script_command's) from REPO to its end, its output captured as text; env
    replaces script_env(devices)."""
    return subprocess.run(script_command(script, *args), capture_output=True, text=True,
                          cwd=REPO, env=script_env(devices) if env is None else env,
                          timeout=timeout)


def start_script(script: str, *args, devices: int | None = None, env: dict | None = None,
                 **popen) -> subprocess.Popen:
    """Start script (script_command's) from REPO in the background; popen goes to Popen
    (default: stdout and stderr together, as text, through a pipe)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
    return subprocess.Popen(script_command(script, *args), cwd=REPO,
                            env=script_env(devices) if env is None else env, **popen)


def load_script(name: str):
    """scripts/<name>.py loaded afresh as a module, to call its functions (main) in process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
