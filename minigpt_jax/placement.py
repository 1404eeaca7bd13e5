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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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
