"""Print what an Orbax checkpoint of minigpt_jax holds.

PATH is an experiment folder (outcome/checkpoints/<name>, its latest step is
shown) or one step folder (outcome/checkpoints/<name>/<step>). Prints the step,
the config, every parameter with shape, dtype and count, the totals, a summary
of the optimizer state and the size on disk.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from flat(tree[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from flat(v, f"{prefix}[{i}]")
    elif tree is not None:
        yield prefix, tree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="inspect_checkpoint.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("path", help="outcome/checkpoints/<name> or outcome/checkpoints/<name>/<step>")
    args = p.parse_args(argv)

    import numpy as np
    import orbax.checkpoint as ocp

    from minigpt_jax.checkpoint import CheckpointError, locate

    try:
        directory, step = locate(pathlib.Path(args.path))
        mngr = ocp.CheckpointManager(directory)
        got = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
    except CheckpointError as e:
        print(f"inspect_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"inspect_checkpoint.py: error: {args.path}: not a readable minigpt_jax checkpoint"
              f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
        return 2
    state, config = got["state"], got["config"]
    step_dir = directory / str(step)
    size = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())

    print(f"checkpoint  {step_dir}")
    print(f"step        {int(np.asarray(state['step']))}   (saved steps: {', '.join(map(str, mngr.all_steps()))})")
    print(f"size        {human(size)} on disk")
    print("config      " + json.dumps(config, sort_keys=True))
    print()
    params = list(flat(state["params"]))
    width = max(len(n) for n, _ in params)
    print(f"{'parameter':<{width}}  {'shape':<16} {'dtype':<8} {'count':>12}")
    total = 0
    for name, x in params:
        x = np.asarray(x)
        total += x.size
        print(f"{name:<{width}}  {str(tuple(x.shape)):<16} {str(x.dtype):<8} {x.size:>12,}")
    nbytes = sum(np.asarray(x).nbytes for _, x in params)
    print(f"{'total':<{width}}  {len(params)} tensors{'':<7} {'':<8} {total:>12,}  ({human(nbytes)})")
    print()
    opt = list(flat(state["opt_state"]))
    opt_count = sum(np.asarray(x).size for _, x in opt)
    print(f"optimizer   AdamW state: {len(opt)} arrays, {opt_count:,} numbers"
          f" ({human(sum(np.asarray(x).nbytes for _, x in opt))})")
    for name, x in opt:
        x = np.asarray(x)
        if x.size == 1:
            print(f"  {name} = {x.item()}")
    moments = {}
    for name, x in opt:
        for m in ("mu", "nu"):
            if f".{m}." in f".{name}.":
                moments.setdefault(m, []).append(np.asarray(x))
    for m, xs in sorted(moments.items()):
        flat_x = np.concatenate([x.ravel() for x in xs])
        label = "first moment (mu)" if m == "mu" else "second moment (nu)"
        print(f"  {label}: {flat_x.size:,} numbers, mean |x| {np.abs(flat_x).mean():.3e}, max |x| {np.abs(flat_x).max():.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
