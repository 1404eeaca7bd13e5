"""Process set-up around training: the host allocator, the compilation cache, GPU visibility.

- `restrict_gpus` runs before JAX initialises its backends (the CUDA driver
  reads CUDA_VISIBLE_DEVICES once): it is pure, taking the environment as a
  mapping and returning the variables to set, so it is tested without a GPU.
- `tune_host_allocator` and `enable_compilation_cache` run once, before the
  first computation.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping

import jax
import numpy as np


def tune_host_allocator(platform: str) -> bool:
    """On the CPU platform, keep freed host memory in the process instead of returning it to the OS.

    XLA:CPU (and PyTorch) allocate each step's large buffers anew; by default
    glibc maps every block over 32 MB fresh from the kernel and unmaps it on
    free, so each step touches ~700 MB of new pages and page faults took more
    time than the matmuls (BENCHMARKS.md). Here every block comes from one
    heap that is never trimmed below 2 GB. `platform` is the one the training
    runs on ("cpu", "gpu", "tpu"): accelerators keep their buffers in device
    memory, and the setting was measured only on the CPU, so it applies there
    only. Call it once, before the first computation; it changes no number.
    Returns whether it applied (CPU, glibc on Linux).
    """
    if platform != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
        return bool(
            libc.mallopt(M_MMAP_MAX, 0)
            and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
            and libc.mallopt(M_ARENA_MAX, 1)
        )
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False


def enable_compilation_cache() -> None:
    """Keep compiled steps on disk (unless the user chose a cache): a rerun, a resume
    or another experiment of the same shape skips XLA compilation."""
    if jax.config.jax_compilation_cache_dir is None:
        from minigpt_jax.files import cache_dir

        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def cuda_installed() -> bool:
    """Whether a JAX CUDA plugin is installed (jax[cuda12] or jax[cuda13]); imports nothing."""
    return any(importlib.util.find_spec(f"jax_cuda{v}_plugin") is not None for v in (12, 13))


def gpu_count(dev: str = "/dev") -> int | None:
    """NVIDIA GPUs this process can open (/dev/nvidiaN); None without the driver's files."""
    path = pathlib.Path(dev)
    if not (path / "nvidiactl").exists():
        return None
    return sum(1 for p in path.iterdir() if re.fullmatch(r"nvidia\d+", p.name))


@dataclasses.dataclass(frozen=True)
class GpuRestriction:
    env: dict[str, str]  # variables to set in os.environ before JAX initialises
    index: dict[int, int] | None  # the user's device index -> JAX's, or None: unchanged


def restrict_gpus(
    devices: Iterable[int] | None, environ: Mapping[str, str], cuda: bool, count: int | None = None
) -> GpuRestriction:
    """Keep JAX off the GPUs that `--devices` does not list.

    devices: the user's indices (None: every device). environ: the process's
    environment, not changed here. cuda: whether a JAX CUDA plugin is installed
    (`cuda_installed()`). count: the machine's GPUs if known (`gpu_count()`).

    When JAX would pick CUDA (JAX_PLATFORMS unset, or naming cuda or gpu first)
    and CUDA_VISIBLE_DEVICES is unset, it becomes the listed indices that exist,
    in ascending order, so JAX numbers them 0, 1, ...; `index` maps each listed
    index to its new number (indices left out have none: the caller skips them,
    as without a restriction). When none of them exists every GPU stays visible
    (docs/spec.md: then every available device is used). A CUDA_VISIBLE_DEVICES the
    user set is kept. XLA_PYTHON_CLIENT_PREALLOCATE becomes "false" unless set,
    so that JAX does not reserve most of each visible GPU's memory up front on
    GPUs that may be shared.
    """
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    on_cuda = platforms[0] in ("cuda", "gpu") if platforms else cuda
    if not on_cuda:
        return GpuRestriction({}, None)
    env = {}
    if "XLA_PYTHON_CLIENT_PREALLOCATE" not in environ:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if devices is None or "CUDA_VISIBLE_DEVICES" in environ:
        return GpuRestriction(env, None)
    # ascending: CUDA stops reading the list at the first index that does not exist
    kept = sorted({i for i in devices if i >= 0 and (count is None or i < count)})
    if not kept:
        return GpuRestriction(env, None)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, kept))
    return GpuRestriction(env, {i: n for n, i in enumerate(kept)})


def sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True if `flag` is true in any process: every process must stop at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def init_distributed(coordinator: str | None, num_processes, process_id) -> None:
    """jax.distributed.initialize from run.py's flags, before anything asks JAX for devices;
    nothing when none is given; ValueError when only some are."""
    given = [coordinator, num_processes, process_id]
    if all(v is None for v in given):
        return
    if any(v is None for v in given):
        raise ValueError("a multi-process run needs all of --coordinator, --num-processes and --process-id")
    try:
        n = int(num_processes)
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"--num-processes {num_processes!r}: expected a positive integer")
    try:
        pid = int(process_id)
    except ValueError:
        raise ValueError(f"--process-id {process_id!r}: expected an integer in 0..{n - 1}") from None
    if not 0 <= pid < n:
        raise ValueError(f"--process-id {pid}: expected an integer in 0..{n - 1}")
    # CPU devices need gloo for collectives across processes; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, n, pid)
