"""Print what an Orbax checkpoint of minigpt_jax holds.

PATH is an experiment folder (outcome/checkpoints/<name>, its latest step is
shown) or one step folder (outcome/checkpoints/<name>/<step>). Prints the step,
the config and progress records, every parameter with shape, dtype and count, the
totals, a summary of the optimizer state and the size on disk. It reads the
checkpoint as minigpt_jax.checkpoint lays it out (checkpoint.read_saved).
"""

from __future__ import annotations

import json
import pathlib
import sys

from minigpt_jax import cli


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def main(argv=None) -> int:
    p = cli.parser("inspect_checkpoint.py", __doc__)
    p.add_argument("path", help="outcome/checkpoints/<name> or outcome/checkpoints/<name>/<step>")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict

    from minigpt_jax.checkpoint import CheckpointError, read_saved

    try:
        saved = read_saved(pathlib.Path(args.path))
    except CheckpointError as e:
        return cli.error("inspect_checkpoint.py", str(e))
    state = saved.state
    size = sum(f.stat().st_size for f in saved.path.rglob("*") if f.is_file())

    print(f"checkpoint  {saved.path}")
    print(f"step        {int(np.asarray(state['step']))}"
          f"   (saved steps: {', '.join(map(str, saved.steps))})")
    print(f"size        {human(size)} on disk")
    print("config      " + json.dumps(saved.config, sort_keys=True))
    print("progress    " + json.dumps(saved.progress, sort_keys=True))
    print()
    params = sorted(flatten_dict(state["params"], sep=".").items())
    width = max(len(n) for n, _ in params)
    print(f"{'parameter':<{width}}  {'shape':<16} {'dtype':<8} {'count':>12}")
    total = 0
    for name, x in params:
        x = np.asarray(x)
        total += x.size
        print(f"{name:<{width}}  {str(tuple(x.shape)):<16} {str(x.dtype):<8} {x.size:>12,}")
    nbytes = sum(np.asarray(x).nbytes for _, x in params)
    print(f"{'total':<{width}}  {len(params)} tensors{'':<7} {'':<8} {total:>12,}"
          f"  ({human(nbytes)})")
    print()
    # optax's state holds tuples (saved as lists), which flatten_dict does not enter: jax's paths
    opt = [(jax.tree_util.keystr(k, simple=True, separator="."), np.asarray(x))
           for k, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])]
    opt_count = sum(x.size for _, x in opt)
    print(f"optimizer   AdamW state: {len(opt)} arrays, {opt_count:,} numbers"
          f" ({human(sum(x.nbytes for _, x in opt))})")
    for name, x in opt:
        if x.size == 1:
            print(f"  {name} = {x.item()}")
    moments = {}
    for name, x in opt:
        for m in ("mu", "nu"):
            if f".{m}." in f".{name}.":
                moments.setdefault(m, []).append(x)
    for m, xs in sorted(moments.items()):
        flat_x = np.concatenate([x.ravel() for x in xs])
        label = "first moment (mu)" if m == "mu" else "second moment (nu)"
        print(f"  {label}: {flat_x.size:,} numbers, mean |x| {np.abs(flat_x).mean():.3e},"
              f" max |x| {np.abs(flat_x).max():.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
