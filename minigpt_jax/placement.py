"""Where an experiment's arrays live: one device, or a data-parallel mesh.

- One `Mesh` with a single axis "data" over the experiment's devices: with one
  device this is plain placement on it; with several, every batch is split
  along its rows (NamedSharding P("data")) and the parameters and optimizer
  state are replicated (P()). The jitted step is unchanged: XLA inserts the
  gradient all-reduce.
- Across processes (`jax.distributed.initialize`), the mesh spans every
  process's devices. Each process computes the same global batch and supplies
  the rows of its own devices (`make_array_from_callback`), so no process
  needs the others' data.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class Placement:
    """The devices of one experiment and how its arrays are laid out on them."""

    def __init__(self, devices):
        self.devices = tuple(devices)
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.rows = NamedSharding(self.mesh, P("data"))  # (B, L) batches
        self.stacked_rows = NamedSharding(self.mesh, P(None, "data"))  # (K, B, L) blocks of batches

    @property
    def size(self) -> int:
        return len(self.devices)

    @property
    def label(self) -> str:
        """'cpu:1' for one device, 'cpu:0-3' (or 'cpu:0,2') for a mesh."""
        platform = self.devices[0].platform
        ids = [d.id for d in self.devices]
        if len(ids) == 1:
            return f"{platform}:{ids[0]}"
        if ids == list(range(ids[0], ids[0] + len(ids))):
            return f"{platform}:{ids[0]}-{ids[-1]}"
        return f"{platform}:{','.join(map(str, ids))}"

    def put(self, tree, sharding=None):
        """Place every leaf (host or device array) with `sharding` (default: replicated)."""
        sharding = sharding or self.replicated
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)

        def one(x):
            x = np.asarray(jax.device_get(x))
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        return jax.tree_util.tree_map(one, tree)

    def put_batch(self, batch: np.ndarray):
        """A (B, L) batch split by rows over the devices."""
        return self.put(batch, self.rows)


# --- device lists: the PyTorch project's --devices rule ---------------------------------


def device_indices(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; anything else is a UsageError (before JAX starts)."""
    indices = []
    for part in text.split(","):
        try:
            indices.append(int(part))
        except ValueError:
            raise ValueError(f"--devices {text!r}: {part.strip()!r} is not an integer;"
                             " expected indices into jax.devices(), e.g. --devices 1,2,3") from None
    return indices


def parse_devices(text: str | None, n_experiments: int, data_parallel: bool = False,
                  index: dict[int, int] | None = None) -> tuple[list, str | None]:
    """Per experiment, the tuple of devices it runs on; and a notice when some listed
    indices do not exist (the PyTorch project's rule: those are left out; none left,
    every available device is used; on a CPU-only machine that is the CPU).

    index: the user's GPU index -> JAX's, when only the listed GPUs were made
    visible (host.restrict_gpus); indices not in it do not exist.
    """
    devices = jax.devices()
    if text is None:
        return [tuple(devices) if data_parallel else (devices[0],)] * n_experiments, None
    indices = device_indices(text)
    exists = (lambda i: i in index) if index is not None else (lambda i: 0 <= i < len(devices))
    jax_index = (lambda i: index[i]) if index is not None else (lambda i: i)
    notice = None
    kept = [i for i in indices if exists(i)]
    if len(kept) < len(indices):
        missing = [i for i in indices if i not in kept]
        if not kept:
            kept, jax_index = list(range(len(devices))), (lambda i: i)
        notice = (f"--devices {text}: {len(devices)} {devices[0].platform} device(s) found,"
                  f" no index {','.join(map(str, missing))}; using {','.join(map(str, kept))}")
    devices = {i: devices[jax_index(i)] for i in kept}
    indices = kept
    if data_parallel:
        if len(set(indices)) != len(indices):
            raise ValueError(f"--devices {text}: a device is listed twice; data parallelism needs"
                             " distinct devices")
        return [tuple(devices[i] for i in indices)] * n_experiments, notice
    return [(devices[indices[i % len(indices)]],) for i in range(n_experiments)], notice
