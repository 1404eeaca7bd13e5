"""Train the MiniGPT experiments and write curves, tables and checkpoints.

Each experiment trains for max_epochs over the data (or --max-steps), holds out
val_fraction of the chunks for validation, checkpoints every ckpt_every steps
and at the end, and writes under --out:
  metrics_<name>.csv, loss_curve_<name>.png, perplexity_curve_<name>.png,
  loss_curves.png, perplexity_curves.png, results_table.txt, results_table.csv,
  checkpoints/<name>/ (Orbax), mini_gpt_<name>.pt (PyTorch state dict).

Examples:
  python scripts/run.py                                   # all five, default corpus
  python scripts/run.py --devices 1,2,3,4,5               # experiment i on jax.devices()[devices[i]]
  python scripts/run.py --only lr_1e-3                    # one experiment, as in run_experiments.py
  python scripts/run.py --experiments baseline --max-steps 20 --data data/
  python scripts/run.py --set seq_len=128 --set lr=3e-4
  python scripts/run.py --resume                          # continue from the latest checkpoints
  python scripts/run.py --data-parallel --devices 0,1,2,3 # each experiment's batches split over 4 devices
  python scripts/run.py --data-parallel --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0

Exit codes: 0 all finished; 1 an experiment failed; 2 bad input; 130 stopped by a signal.
"""

from __future__ import annotations

import argparse
import os
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
                        " (needs torch; default: the embedded corpus of Python's own docs)")
    p.add_argument("--out", default=str(REPO / "outcome"),
                   help="output folder (default: outcome/ in the repository)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the baseline, e.g. --set lr=3e-4 (repeatable;"
                        " each experiment's own override still applies). Keys: "
                        + ", ".join(cfg.field_names()))
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
    """Everything that needs no JAX: experiment names, overrides, integers."""
    overrides = cfg.parse_overrides(args.overrides)
    if args.seed is not None:
        overrides["seed"] = cfg.parse_value("seed", args.seed)
    if args.only is not None and args.experiments is not None:
        raise UsageError("--only and --experiments both given; expected one of them")
    if args.only is not None:
        text = ",".join(cfg.EXPERIMENTS) if args.only.strip() == "all" else args.only
        flag = "--only"
    else:
        text = args.experiments if args.experiments is not None else ",".join(cfg.EXPERIMENTS)
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
    configs = {n: cfg.experiment_config(n, overrides) for n in names}
    return configs, positive_int("--max-steps", args.max_steps)


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


def parse_devices(text: str | None, n_experiments: int, data_parallel: bool = False) -> tuple[list, str | None]:
    """Per experiment, the tuple of devices it runs on; and a notice when some listed
    indices do not exist (the PyTorch project's rule: those are left out; none left,
    every available device is used; on a CPU-only machine that is the CPU)."""
    import jax

    devices = jax.devices()
    if text is None:
        return [tuple(devices) if data_parallel else (devices[0],)] * n_experiments, None
    indices = device_indices(text)
    notice = None
    kept = [i for i in indices if 0 <= i < len(devices)]
    if len(kept) < len(indices):
        missing = [i for i in indices if i not in kept]
        if not kept:
            kept = list(range(len(devices)))
        notice = (f"--devices {text}: {len(devices)} {devices[0].platform} device(s) found, no index"
                  f" {','.join(map(str, missing))}; using {','.join(map(str, kept))}")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    try:
        configs, max_steps = check_arguments(args)
        if args.devices is not None:
            device_indices(args.devices)
        check_out_dir(out)
    except (cfg.ConfigError, UsageError) as e:
        fail(str(e))

    # Heavy imports once the arguments are known to be good: --help and errors stay fast.
    from minigpt_jax import corpus, data, report, runner, train

    runner.enable_compilation_cache()
    train.tune_host_allocator()  # before the first computation: see BENCHMARKS.md

    try:
        init_distributed(args)
        devices, notice = parse_devices(args.devices, len(configs), args.data_parallel)
        if notice and runner.jax.process_index() == 0:
            print(f"run.py: {notice}", file=sys.stderr)
        for name, c in configs.items():
            if c.batch_size % len(devices[0]):
                raise UsageError(f"{name}: batch_size={c.batch_size} is not divisible by the"
                                 f" {len(devices[0])} data-parallel devices")
        if args.data is not None:
            import torch_compat

            seqs, source = torch_compat.load_sequences(
                args.data, vocab_size=max(c.vocab_size for c in configs.values()))
        else:
            seqs, source = corpus.default_corpus(), "default corpus"
        for c in configs.values():
            data.check_sequences(seqs, source, c.vocab_size)
        if args.resume:
            runner.check_resumable(out, configs)
    except (UsageError, data.DataError, runner.checkpoint.CheckpointError, ImportError) as e:
        fail(str(e))

    def chunks_for(c):
        return data.split_chunks(data.chunk_sequences(seqs, c.seq_len), c.val_fraction, c.seed)

    user = ", ".join(args.overrides)
    experiments = [
        runner.Experiment(name, c, devs, ", ".join(filter(None, [runner.describe(name), user])))
        for (name, c), devs in zip(configs.items(), devices)
    ]
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt  # the second signal: abort (below)
        stop.set()
        print(f"\nrun.py: {signal.Signals(signum).name}: saving checkpoints and stopping"
              " (send again to abort)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"run.py: {len(experiments)} experiment(s) on {source}; writing to {out}", file=sys.stderr)
    try:
        results = runner.run_all(experiments, chunks_for, out, max_steps, args.resume, stop,
                                 on_result=lambda r: runner.write_experiment_outputs(out, r))
        runner.write_summary(out, results)
    except KeyboardInterrupt:
        # Leave now, without waiting for the experiments' threads: every output is written to a
        # temporary name and renamed, every checkpoint commits by a rename, so what exists is whole.
        print("\nrun.py: aborted; the checkpoints saved so far are kept (--resume continues from them)",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    if runner.jax.process_index() == 0:
        for r in results:
            print(f"  {r.name:<14} {r.status}", file=sys.stderr)
        print(f"run.py: results in {out}/results_table.txt", file=sys.stderr)
    if stop.is_set():
        return 130
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
