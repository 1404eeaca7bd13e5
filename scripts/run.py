"""Train the MiniGPT experiments and write curves, tables and checkpoints.

Each experiment trains for max_epochs over the data (or --max-steps), holds out
val_fraction of the sequences for validation (a sample of eval_batches batches
every eval_every steps, all of them at the end), checkpoints every ckpt_minutes
of wall time (and every ckpt_every steps if set), at the end and on Ctrl-C, and
writes under --out:
  metrics_<name>.csv, metrics_<name>_val.csv, metrics_<name>.jsonl (every step),
  tensorboard/<name>/ (tensorboard --logdir outcome/tensorboard),
  loss_curve_<name>.png, perplexity_curve_<name>.png,
  loss_curves.png, perplexity_curves.png, results_table.txt, results_table.csv,
  report.md (and report.html): one page with the model, data, setup and results,
  checkpoints/<name>/ (Orbax), mini_gpt_<name>.pt (PyTorch state dict).

Examples:
  python scripts/run.py                                   # all five, default corpus
  python scripts/run.py --devices 1,2,3,4,5               # experiment i on jax.devices()[devices[i]]
  python scripts/run.py --only lr_1e-3                    # one experiment, as in run_experiments.py
  python scripts/run.py --experiments baseline --max-steps 20 --data data/
  python scripts/run.py --set seq_len=128 --set lr=3e-4
  python scripts/run.py --sweep lr=1e-3,3e-4 --sweep batch_size=16,64  # a 2x2 grid over baseline
  python scripts/run.py --data my_texts/ --set lr_schedule=cosine --set warmup_steps=100
  python scripts/run.py --resume                          # continue from the latest checkpoints
  python scripts/run.py --data-parallel --devices 0,1,2,3 # each experiment's batches split over 4 devices
  python scripts/run.py --data-parallel --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0

Exit codes: 0 all finished; 1 an experiment failed; 2 bad input; 130 stopped by a signal.
"""

from __future__ import annotations

import argparse
import os
import shlex
import pathlib
import signal
import sys
import tempfile
import threading

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from minigpt_jax import config as cfg  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiments", default=None, metavar="A,B,...",
                   help="comma-separated experiments to run (default: all: " + ",".join(cfg.EXPERIMENTS) + ")")
    p.add_argument("--only", default=None, metavar="NAME",
                   help="one experiment by name, or 'all' (the PyTorch project's run_experiments.py flag;"
                        " the same as --experiments NAME)")
    p.add_argument("--devices", default=None, metavar="I,J,...",
                   help="indices into jax.devices(): experiment i runs on the i-th listed device, cycling"
                        " when fewer are listed than experiments; experiments on distinct devices run at"
                        " the same time. Indices that do not exist are left out with a notice; if none"
                        " exists, every available device is used (default: all on the first device,"
                        " one after another)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="tokenized_data.pt, sample_dataset.pt, or a folder holding one of them"
                        " (needs torch); or your own text: a .txt file or a folder of them, tokenized"
                        " with GPT-2 BPE once and cached (default: the embedded corpus of Python's"
                        " own docs)")
    p.add_argument("--text-docs", default="file", metavar="file|block",
                   help="with .txt data: one document per file, or per blank-line-separated block"
                        " (SPEC's segmentation drops documents under 32 tokens: short blocks want"
                        " --set segmentation=chunks) (default: %(default)s)")
    p.add_argument("--out", default=str(REPO / "outcome"),
                   help="output folder (default: outcome/ in the repository)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the baseline, e.g. --set lr=3e-4 (repeatable;"
                        " each experiment's own override still applies). Keys: "
                        + ", ".join(cfg.field_names()))
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run every value of KEY (repeatable: the grid of all keys) over the chosen"
                        " experiments (default with --sweep: baseline), named as the PyTorch project"
                        " names them: lr_1e-3, lr_1e-3_batch_size_16, n_layers_1_lr_1e-3")
    p.add_argument("--stack", action="store_true",
                   help="train experiments that share a device and differ only in values (lr,"
                        " weight_decay, seed, max_epochs, val_fraction: typically a --sweep) together"
                        " as one vmapped program; each keeps its own data order, metrics, checkpoint"
                        " and .pt (see README, Sweeps)")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log every experiment's metrics to Weights & Biases, project PROJECT"
                        " (needs the wandb package; nothing else imports it)")
    p.add_argument("--max-steps", default=None, metavar="N",
                   help="stop each experiment after N steps in all (default: max_epochs over the data)")
    p.add_argument("--seed", default=None, metavar="S", help="shorthand for --set seed=S")
    p.add_argument("--data-parallel", action="store_true",
                   help="train one experiment at a time, each batch split over all --devices"
                        " (default: every device, of every process) with replicated parameters;"
                        " batch_size must be divisible by the number of devices")
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"), metavar="HOST:PORT",
                   help="multi-process run: address of process 0's coordinator, passed to"
                        " jax.distributed.initialize (env JAX_COORDINATOR_ADDRESS); only process 0"
                        " writes outputs, checkpoints are written collectively")
    p.add_argument("--num-processes", default=os.environ.get("JAX_NUM_PROCESSES"), metavar="N",
                   help="multi-process run: number of processes (env JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", default=os.environ.get("JAX_PROCESS_ID"), metavar="I",
                   help="multi-process run: this process's index, 0..N-1 (env JAX_PROCESS_ID)")
    p.add_argument("--resume", action="store_true",
                   help="continue each experiment from its latest checkpoint under --out"
                        " (the config must match); experiments without one start fresh")
    return p.parse_args(argv)


class UsageError(Exception):
    pass


def fail(message: str) -> None:
    print(f"run.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def positive_int(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a positive integer") from None
    if n <= 0:
        raise UsageError(f"{flag} {n}: must be a positive integer")
    return n


def check_arguments(args) -> tuple[dict, int | None]:
    """Everything that needs no JAX: experiment names, overrides, sweeps, integers ->
    ({name: (config, override text)}, max_steps)."""
    overrides = cfg.parse_overrides(args.overrides)
    if args.seed is not None:
        overrides["seed"] = cfg.parse_value("seed", args.seed)
    sweeps = cfg.parse_sweeps(args.sweep)
    if args.text_docs not in ("file", "block"):
        raise UsageError(f"--text-docs {args.text_docs!r}: expected file (one document per file) or block"
                         " (one per blank-line-separated block)")
    if args.only is not None and args.experiments is not None:
        raise UsageError("--only and --experiments both given; expected one of them")
    if args.only is not None:
        text = ",".join(cfg.EXPERIMENTS) if args.only.strip() == "all" else args.only
        flag = "--only"
    else:
        default = "baseline" if sweeps else ",".join(cfg.EXPERIMENTS)
        text = args.experiments if args.experiments is not None else default
        flag = "--experiments"
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"{flag} is empty; valid: all, " + ", ".join(cfg.EXPERIMENTS))
    if flag == "--only" and len(names) > 1:
        raise UsageError(f"--only {args.only!r}: expected one experiment name or 'all'"
                         " (use --experiments for a list)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"--experiments names {', '.join(dupes)} twice")
    plan = cfg.plan(names, overrides, ", ".join(args.overrides), sweeps)
    return plan, positive_int("--max-steps", args.max_steps)


def device_indices(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; anything else is a UsageError (before JAX starts)."""
    indices = []
    for part in text.split(","):
        try:
            indices.append(int(part))
        except ValueError:
            raise UsageError(f"--devices {text!r}: {part.strip()!r} is not an integer;"
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
    import jax

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
        notice = (f"--devices {text}: {len(devices)} {devices[0].platform} device(s) found, no index"
                  f" {','.join(map(str, missing))}; using {','.join(map(str, kept))}")
    devices = {i: devices[jax_index(i)] for i in kept}
    indices = kept
    if data_parallel:
        if len(set(indices)) != len(indices):
            raise UsageError(f"--devices {text}: a device is listed twice; data parallelism needs distinct devices")
        return [tuple(devices[i] for i in indices)] * n_experiments, notice
    return [(devices[indices[i % len(indices)]],) for i in range(n_experiments)], notice


def init_distributed(args) -> None:
    """jax.distributed.initialize from the flags, before anything asks JAX for devices."""
    given = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in given):
        return
    if any(v is None for v in given):
        raise UsageError("a multi-process run needs all of --coordinator, --num-processes and --process-id")
    n = positive_int("--num-processes", args.num_processes)
    try:
        pid = int(args.process_id)
    except ValueError:
        raise UsageError(f"--process-id {args.process_id!r}: expected an integer in 0..{n - 1}") from None
    if not 0 <= pid < n:
        raise UsageError(f"--process-id {pid}: expected an integer in 0..{n - 1}")
    import jax

    # CPU devices need gloo for collectives across processes; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, n, pid)


def check_out_dir(out: pathlib.Path) -> None:
    """The output folder, or the part of its path that exists, must take a new entry. Tried
    for real, leaving nothing: root passes every permission check, yet /proc or a read-only
    mount still refuse."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is not a folder; expected a writable folder")
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".run-py-write-test-").cleanup()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create anything in {probe} ({e.strerror});"
                         " expected a writable folder") from None


def is_text(path: pathlib.Path) -> bool:
    """A .txt file, or a folder of .txt files without the PyTorch project's data files."""
    from torch_compat.data import DATA_FILES

    if path.is_dir():
        return not any((path / name).is_file() for name in DATA_FILES) and any(path.rglob("*.txt"))
    return path.suffix == ".txt"


def load_sources(path: str | None, vocab_size: int, text_docs: str = "file"):
    """The training data once, checked: a .pt file or data folder, .txt text, or the default corpus."""
    from minigpt_jax import sources

    if path is None:
        return sources.default_corpus(vocab_size)
    if is_text(pathlib.Path(path)):
        from minigpt_jax import text_source

        return sources.from_arrays(text_source.load_text(pathlib.Path(path), text_docs), f"{path} (text)",
                                   "tokenized", vocab_size)
    from torch_compat.data import read_sequences

    return read_sequences(path, vocab_size)


def wandb_writers(project: str | None):
    """experiment -> [a W&B run named after it], or None without --wandb."""
    if project is None:
        return None
    from minigpt_jax import metrics

    return lambda e: [metrics.WandbWriter(project=project, name=e.name, config=e.config.to_dict())]


def export_state_dict(out: pathlib.Path, r) -> None:
    """outcome/mini_gpt_<name>.pt, or one notice without torch."""
    from tqdm.auto import tqdm

    try:
        import torch_compat

        torch_compat.require_torch(f"exporting mini_gpt_{r.name}.pt")
    except ImportError as e:
        tqdm.write(f"{r.name}: no mini_gpt_{r.name}.pt ({str(e).splitlines()[0]})")
        return
    import jax

    try:
        torch_compat.save_state_dict(jax.device_get(r.state.params), out / f"mini_gpt_{r.name}.pt", r.config)
    except torch_compat.StateDictError as e:  # a model their model.py cannot compute: skipped, never wrong
        tqdm.write(f"{r.name}: no mini_gpt_{r.name}.pt ({e})")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    try:
        plan, max_steps = check_arguments(args)
        configs = {name: c for name, (c, _) in plan.items()}
        listed = device_indices(args.devices) if args.devices is not None else None
        check_out_dir(out)
    except (cfg.ConfigError, UsageError) as e:
        fail(str(e))

    # Before JAX starts: keep it off the GPUs --devices does not list, preallocating nothing.
    from minigpt_jax import host

    restriction = host.restrict_gpus(listed, os.environ, host.cuda_installed(), host.gpu_count())
    os.environ.update(restriction.env)

    # Heavy imports once the arguments are known to be good: --help and errors stay fast.
    import jax

    from minigpt_jax import checkpoint, data, loop, optim, parallel, report, writeup

    host.enable_compilation_cache()
    lead = True
    try:
        init_distributed(args)
        lead = jax.process_index() == 0
        host.tune_host_allocator(jax.default_backend())  # before the first computation: BENCHMARKS.md
        devices, notice = parse_devices(args.devices, len(configs), args.data_parallel, restriction.index)
        if notice and lead:
            print(f"run.py: {notice}", file=sys.stderr)
        for name, c in configs.items():
            if c.batch_size % len(devices[0]):
                raise UsageError(f"{name}: batch_size={c.batch_size} is not divisible by the"
                                 f" {len(devices[0])} data-parallel devices")
        vocab_sizes = sorted({c.vocab_size for c in configs.values()})
        seqs = load_sources(args.data, vocab_sizes[-1], args.text_docs)  # read and checked once
        for vocab_size in vocab_sizes[:-1]:
            seqs.check(vocab_size)  # a smaller vocabulary than the largest is checked once more
        for name, c in configs.items():
            prepared = data.prepare(seqs, c)  # once per data setting, shared by those that agree
            total = data.steps_per_epoch(len(prepared.train), c.batch_size) * c.max_epochs
            try:
                optim.lr_shape(c, min(total, max_steps or total))  # the schedule fits the run
            except cfg.ConfigError as e:
                raise UsageError(f"{name}: {e}") from None
        if args.wandb is not None:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UsageError(f"--wandb {args.wandb}: the wandb package is not installed;"
                                 " expected pip install wandb, or no --wandb") from None
        if args.resume:
            try:
                checkpoint.check_resumable(out, configs)
            except checkpoint.CheckpointError as e:
                raise UsageError(f"--resume: {e}") from None
    except (UsageError, data.DataError, ImportError) as e:
        fail(str(e))

    experiments = [loop.Experiment(name, c, devs, text) for (name, (c, text)), devs in zip(plan.items(), devices)]
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt  # the second signal: abort (below)
        stop.set()
        print(f"\nrun.py: {signal.Signals(signum).name}: saving checkpoints and stopping"
              " (send again to abort)", file=sys.stderr)

    def on_result(r) -> None:
        """Curves and the PyTorch export of an experiment, as soon as it finishes."""
        if not lead:
            return
        if r.rows:
            report.plot_experiment(out, r.name, r.rows, r.val_rows)
        if r.state is not None:
            export_state_dict(out, r)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if lead:
        print(f"run.py: {len(experiments)} experiment(s) on {seqs.describe()}; writing to {out}",
              file=sys.stderr)
    try:
        results = parallel.run_all(experiments, lambda c: data.prepare(seqs, c), out, max_steps,
                                   args.resume, stop, on_result=on_result, stack=args.stack,
                                   writers=wandb_writers(args.wandb))
        if lead:
            report.plot_comparison(out, {r.name: (r.rows, r.val_rows) for r in results if r.rows})
            report.write_results_table(out, [r.table_row() for r in results])
            command = shlex.join(["scripts/run.py", *(sys.argv[1:] if argv is None else argv)])
            writeup.write_report(out, results, writeup.data_statistics(seqs, results),
                                 writeup.source_text(seqs),
                                 {"Command": f"`{command}`", "Resumed": "yes" if args.resume else "no",
                                  "Stacked": "yes" if args.stack else "no"})
    except KeyboardInterrupt:
        # Leave now, without waiting for the experiments' threads: plots and tables are written
        # to a temporary name and renamed, every checkpoint commits by a rename, and a metrics
        # file's torn last row is cut when --resume continues from the checkpoints.
        print("\nrun.py: aborted; the checkpoints saved so far are kept (--resume continues from them)",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    if lead:
        for r in results:
            print(f"  {r.name:<14} {r.status}", file=sys.stderr)
        print(f"run.py: results in {out}/results_table.txt", file=sys.stderr)
    if stop.is_set():
        return 130
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit as e:
        if e.code == 2:
            # Bad input: nothing was trained or written. Leave without the interpreter's
            # shutdown, where tensorstore reads still in flight from a refused checkpoint
            # print "Event loop is closed" tracebacks after the one line that matters.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        raise
