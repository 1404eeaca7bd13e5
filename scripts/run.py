"""Train the MiniGPT experiments and write curves, tables, report.md and checkpoints.

Each experiment trains for max_epochs over the data (or --max-steps), evaluates a
held-out sample every eval_every steps and at the end, checkpoints by the clock, at
the end and on Ctrl-C, and writes under --out: report.md (open it first), metrics
CSV/JSONL, tensorboard/, loss and perplexity PNGs, results_table.{txt,csv},
checkpoints/<name>/ (Orbax) and mini_gpt_<name>.pt (docs/options.md).

Examples:
  python scripts/run.py                                   # all five, default corpus
  python scripts/run.py --devices 1,2,3,4,5               # experiment i on the i-th device
  python scripts/run.py --only lr_1e-3                    # one, as in run_experiments.py
  python scripts/run.py --experiments baseline --max-steps 20 --data data/
  python scripts/run.py --sweep lr=1e-3,3e-4 --sweep batch_size=16,64  # a 2x2 grid over baseline
  python scripts/run.py --experiments baseline,lr_1e-3 --seeds 3  # mean, spread, paired tests
  python scripts/run.py --resume                          # continue from the latest checkpoints
  python scripts/run.py --only baseline --export hf       # also outcome/hf/baseline/ (transformers)
  python scripts/run.py --only baseline --init-from ~/gpt2  # fine-tune a local GPT-2 folder
  python scripts/run.py --data-parallel --devices 0,1,2,3 # each batch split over 4 devices

Exit codes: 0 all finished; 1 an experiment failed; 2 bad input; 130 stopped by a signal.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import signal
import sys
import threading

from minigpt_jax import cli, runner
from minigpt_jax import config as cfg

REPO = pathlib.Path(__file__).resolve().parents[1]  # the default --out is its outcome/


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("run.py", __doc__)
    add = p.add_argument
    add("--experiments", metavar="A,B,...", help="experiments to run (default: all: "
        + ",".join(cfg.EXPERIMENTS) + "; with --sweep: baseline)")
    add("--only", metavar="NAME", help="one experiment, or 'all' (the PyTorch project's flag)")
    add("--devices", metavar="I,J,...", help="indices into jax.devices(): experiment i on the"
        " i-th, cycling; indices that do not exist are left out; none left: every device"
        " (default: all on the first device)")
    add("--concurrent", default="1", metavar="N", help="up to N experiments at the same time on"
        " each device (default: %(default)s: one after another; docs/gpus.md)")
    add("--data", metavar="PATH", help="tokenized_data.pt, sample_dataset.pt or a folder of one"
        " (needs torch), or .txt text, a file or a folder (default: the embedded corpus)")
    add("--no-cache", action="store_true", help="read a .pt source without the token cache")
    add("--text-docs", default="file", metavar="file|block", help="with .txt data: a document per"
        " file, or per blank-line-separated block (default: %(default)s)")
    add("--out", default=str(REPO / "outcome"), help="output folder (default: outcome/)")
    cli.add_overrides(p, "override a config field, repeatable (docs/options.md); keys: "
                      + ", ".join(cfg.field_names()))
    add("--sweep", action="append", default=[], metavar="KEY=V1,V2,...", help="run every value"
        " of KEY (repeatable: the grid), named as the PyTorch project does: lr_1e-3")
    add("--stack", action="store_true", help="train experiments that share a device and differ"
        " only in lr, weight_decay, seed, max_epochs, val_fraction as one vmapped program")
    add("--export", choices=["hf"], action="append", default=[], help="also write each finished"
        " experiment as a GPT2LMHeadModel folder, <out>/hf/<name>/ (docs/huggingface.md)")
    add("--init-from", metavar="HF_DIR", help="start every experiment from a local Hugging Face"
        " GPT-2 folder's weights; the model's shape comes from it (docs/huggingface.md)")
    add("--wandb", metavar="PROJECT", help="also log metrics to Weights & Biases (needs wandb)")
    add("--max-steps", metavar="N", help="stop each experiment after N steps (default: max_epochs)")
    add("--seed", metavar="S", help="shorthand for --set seed=S")
    add("--seeds", default="1", metavar="N", help="every experiment with seeds S..S+N-1, stacked"
        " on its device (runs <name>_seed<s>): mean, spread and paired tests (docs/options.md)")
    add("--seeds-apart", action="store_true", help="with --seeds: one seed after another")
    add("--reference", metavar="NAME", help="compare with this experiment (default: baseline)")
    add("--data-parallel", action="store_true", help="one experiment at a time, each batch split"
        " over all --devices (of every process)")
    add("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"), metavar="HOST:PORT",
        help="multi-process run: process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    add("--num-processes", default=os.environ.get("JAX_NUM_PROCESSES"), metavar="N",
        help="multi-process run: number of processes (env JAX_NUM_PROCESSES)")
    add("--process-id", default=os.environ.get("JAX_PROCESS_ID"), metavar="I",
        help="multi-process run: this process's index, 0..N-1 (env JAX_PROCESS_ID)")
    add("--resume", action="store_true", help="continue each experiment from its latest"
        " checkpoint under --out (same config and data); those without one start fresh")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch_compat
    from minigpt_jax import host, placement
    from minigpt_jax.options import RunOptions
    from torch_compat.export import export_result

    out = pathlib.Path(args.out)
    try:  # everything that needs no JAX, checked once, before JAX starts
        overrides = cfg.parse_overrides(args.overrides)
        if args.seed is not None:
            overrides["seed"] = cfg.parse_value("seed", args.seed)
        sweeps = cfg.parse_sweeps(args.sweep)
        names = runner.experiment_names(args.only, args.experiments, sweeps)
        plan = runner.plan(names, overrides, sweeps, ", ".join(args.overrides),
                           runner.positive_int("--seeds", args.seeds))
        devices = placement.device_indices(args.devices) if args.devices is not None else None
        stop = threading.Event()
        opts = RunOptions(
            out=out, max_steps=runner.positive_int("--max-steps", args.max_steps),
            resume=args.resume, stop=stop, stack=args.stack, seeds_apart=args.seeds_apart,
            reference=args.reference, concurrent=runner.positive_int("--concurrent",
                                                                     args.concurrent),
            writers=runner.wandb_writers(args.wandb), on_result=lambda r: export_result(out, r),
            data=args.data, text_docs=args.text_docs, cache=not args.no_cache,
            read_pt=torch_compat.read_sequences, read_bin=torch_compat.read_numpy_state_dict,
            init_from=args.init_from, devices=devices, data_parallel=args.data_parallel,
            export_hf="hf" in args.export,
            command=shlex.join(["scripts/run.py", *(sys.argv[1:] if argv is None else argv)]))
        runner.check(opts, plan)
    except (cfg.ConfigError, ValueError) as e:  # RunError is a ValueError
        return cli.error("run.py", str(e))
    # Before JAX starts: keep it off the GPUs --devices does not list, preallocating nothing.
    restriction = host.restrict_gpus(devices, os.environ, host.cuda_installed(), host.gpu_count())
    os.environ.update(restriction.env)
    host.enable_compilation_cache()
    from minigpt_jax import checkpoint, data

    signal.signal(signal.SIGINT, lambda s, f: on_signal(stop, s))
    signal.signal(signal.SIGTERM, lambda s, f: on_signal(stop, s))
    try:
        host.init_distributed(args.coordinator, args.num_processes, args.process_id)
        import jax

        host.tune_host_allocator(jax.default_backend())  # before the first computation
        results = runner.execute(plan, opts.replace(gpu_index=restriction.index))
    except (cfg.ConfigError, data.DataError, checkpoint.CheckpointError, ValueError,
            ImportError) as e:  # the library's one-line errors: bad input
        return cli.error("run.py", str(e))
    except KeyboardInterrupt:
        # Leave now: every output commits by a rename; --resume cuts a torn metrics row
        print("\nrun.py: aborted; the checkpoints saved so far are kept (--resume continues"
              " from them)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    print(f"run.py: results in {out}/results_table.txt", file=sys.stderr)
    if stop.is_set():
        return 130
    return 0 if all(r.status == "ok" for r in results) else 1


def on_signal(stop: threading.Event, signum) -> None:
    if stop.is_set():
        raise KeyboardInterrupt  # the second signal: abort (main)
    stop.set()
    print(f"\nrun.py: {signal.Signals(signum).name}: saving checkpoints and stopping"
          " (send again to abort)", file=sys.stderr)


def entry() -> None:
    """The command. Bad input leaves without the interpreter's shutdown, where tensorstore
    reads in flight from a refused checkpoint print tracebacks after the one line that matters."""
    code = main()
    if code == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(code)


if __name__ == "__main__":
    entry()
