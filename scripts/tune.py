"""Search hyperparameters with Optuna: each trial one run of a base experiment, pruned from its
periodic evaluations, the study shared by every worker that names the same storage.

Writes under --out: study.db (the default storage), trials/<number>/ (each trial an ordinary
run folder), tune_trials.{txt,csv}, tune_*.png (Optuna's plots), tune_best_command.txt and a
"Hyperparameter search" section in report.md (docs/tuning.md).

Examples:
  python scripts/tune.py --space lr=log:1e-4:1e-2 --trials 20
  python scripts/tune.py --space lr=log:1e-4:3e-3 --space batch_size=16,32 \\
      --space dropout=0:0.2 --trials 40 --max-steps 2000 --data data/
  python scripts/tune.py ... --devices 0,1,2,3      # one worker per GPU, one study
  python scripts/tune.py ... --storage postgresql://me@db-host/optuna --study lr-search
  python scripts/tune.py ... --storage journal:/shared/tune/journal.log  # a shared file system
  python scripts/tune.py ... --enqueue lr=5e-4      # try this point first
  (the same command again continues the study up to --trials)

Exit codes: 0 the study holds --trials trials; 2 bad input; 130 stopped by a signal.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import threading

from minigpt_jax import cli, runner, tune
from minigpt_jax import config as cfg

REPO = pathlib.Path(__file__).resolve().parents[1]  # the default --out is under its outcome/


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("tune.py", __doc__)
    add = p.add_argument
    add("--space", action="append", default=[], metavar="KEY=SPEC", help="a searched config"
        " field, repeatable: KEY=log:LOW:HIGH (log-uniform), KEY=LOW:HIGH (uniform; integers for"
        " an int field) or KEY=V1,V2,... (choices)")
    add("--trials", default="20", metavar="N", help="the study's total number of trials, however"
        " many workers share it (default: %(default)s)")
    add("--only", default="baseline", metavar="NAME", help="the base experiment the trials vary"
        " (default: %(default)s; valid: " + ", ".join(cfg.EXPERIMENTS) + ")")
    cli.add_overrides(p, "fix a config field for every trial, repeatable (docs/options.md)")
    add("--seed", metavar="S", help="shorthand for --set seed=S (the runs' seed)")
    add("--sampler", default="tpe", choices=tune.SAMPLERS, help="tpe (default): Optuna's TPE;"
        " qmc: scrambled Sobol points, for exploring; random")
    add("--sampler-seed", default="0", metavar="S", help="the sampler's seed; worker i of"
        " --devices adds i (default: %(default)s)")
    add("--pruner", default="median", choices=tune.PRUNERS, help="median (default): stop a trial"
        " whose best evaluation so far is worse than the median of earlier trials' at that step;"
        " hyperband; none")
    add("--prune-after", default="5", metavar="N", help="median pruner: finished trials before"
        " any is pruned (default: %(default)s)")
    add("--enqueue", action="append", default=[], metavar="K=V,K=V", help="a point to try"
        " before the sampler's, repeatable (every searched key)")
    add("--study", default="tune", metavar="NAME", help="the study's name in the storage"
        " (default: %(default)s)")
    add("--storage", metavar="URL", help="any Optuna RDB URL (sqlite:///f.db, postgresql://...),"
        " or journal:PATH for a journal file on a shared file system (default: sqlite in --out)")
    add("--heartbeat", default="60", metavar="S", help="seconds between a running trial's"
        " heartbeats; one silent for twice that (its worker died) is failed and queued again"
        " (default: %(default)s)")
    add("--devices", metavar="I,J,...", help="one worker process per listed device, each seeing"
        " only its own; a device listed twice gets two (default: one worker on the first device)")
    add("--data", metavar="PATH", help="as run.py's --data (default: the embedded corpus)")
    add("--no-cache", action="store_true", help="read a .pt source without the token cache")
    add("--text-docs", default="file", metavar="file|block", help="as run.py's --text-docs")
    add("--out", default=str(REPO / "outcome" / "tune"), help="the study's folder"
        " (default: outcome/tune/)")
    add("--max-steps", metavar="N", help="stop each trial after N steps (default: max_epochs)")
    add("--worker", action="store_true", help=argparse.SUPPRESS)  # a child of --devices
    return p.parse_args(argv)


def check(args) -> dict:
    """Everything the command line decides, checked before any training -> the study's
    pieces; ConfigError or ValueError (one line) when anything is wrong."""
    from minigpt_jax import placement

    overrides = cfg.parse_overrides(args.overrides)
    if args.seed is not None:
        overrides["seed"] = cfg.parse_value("seed", args.seed)
    space = tune.parse_space(args.space, args.only, overrides)
    enqueue = tune.parse_enqueue(args.enqueue, space, args.only, overrides)
    corner = {k: p.choices[0] if p.kind == "categorical" else p.low for k, p in space.items()}
    max_steps = runner.positive_int("--max-steps", args.max_steps)
    runner.plan([args.only], {**overrides, **corner})
    out = pathlib.Path(args.out)
    runner.check_out_dir(out)
    if args.data is not None and not pathlib.Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no such file or folder")
    for flag, text in (("--sampler-seed", args.sampler_seed),):
        if not text.isdigit():
            raise ValueError(f"{flag} {text!r}: expected a non-negative integer")
    devices = placement.device_indices(args.devices) if args.devices is not None else None
    return {"overrides": overrides, "space": space, "enqueue": enqueue, "max_steps": max_steps,
            "out": out, "devices": devices, "trials": runner.positive_int("--trials", args.trials),
            "prune_after": runner.positive_int("--prune-after", args.prune_after),
            "heartbeat": runner.positive_int("--heartbeat", args.heartbeat)}


def open_study(args, c):
    storage = tune.open_storage(args.storage, c["out"], c["heartbeat"])
    record = {"base": args.only, "overrides": c["overrides"], "max_steps": c["max_steps"],
              "space": {k: p.spec() for k, p in c["space"].items()}}
    study = tune.open_study(storage, args.study, record,
                            tune.make_sampler(args.sampler, int(args.sampler_seed)),
                            tune.make_pruner(args.pruner, c["prune_after"]))
    study.set_user_attr("search", {"sampler": args.sampler, "pruner": args.pruner})
    return study


def work_here(args, c, study, stop: threading.Event) -> None:
    """This process is the study's one worker: JAX on the chosen device only."""
    from minigpt_jax import host

    devices = c["devices"]
    restriction = host.restrict_gpus(devices, os.environ, host.cuda_installed(), host.gpu_count())
    os.environ.update(restriction.env)  # before JAX starts: see only this worker's GPU
    host.enable_compilation_cache()
    import jax

    host.tune_host_allocator(jax.default_backend())
    import torch_compat
    from torch_compat.export import export_result  # mini_gpt_<name>.pt, as run.py writes it

    job = tune.Job(args.only, c["overrides"], c["space"], c["out"], c["max_steps"], {
        "data": args.data, "devices": devices, "gpu_index": restriction.index,
        "text_docs": args.text_docs, "cache": not args.no_cache,
        "read_pt": torch_compat.read_sequences}, export=export_result)
    tune.work(study, job, c["trials"], stop)


def spawn_workers(args, c, argv, stop: threading.Event) -> int:
    """One child process per device, each `--devices D --worker`, against the same study."""
    children = []
    for i, d in enumerate(c["devices"]):
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *argv, "--devices", str(d),
               "--sampler-seed", str(int(args.sampler_seed) + i), "--worker"]
        children.append(subprocess.Popen(cmd))
    print(f"tune.py: {len(children)} workers on devices {', '.join(map(str, c['devices']))}",
          file=sys.stderr)

    def forward(signum, _frame):
        stop.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, key=lambda code: (code == 2, code != 0, code))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this command says what it does
    try:
        c = check(args)
        study = open_study(args, c)
        if not args.worker:
            for point in c["enqueue"]:
                study.enqueue_trial(point, skip_if_exists=True)
    except (cfg.ConfigError, ValueError) as e:  # TuneError and RunError are ValueErrors
        return cli.error("tune.py", str(e))
    stop = threading.Event()
    code = 0
    if c["devices"] is not None and len(c["devices"]) > 1 and not args.worker:
        code = spawn_workers(args, c, argv, stop)
    else:
        from minigpt_jax import checkpoint, data

        signal.signal(signal.SIGINT, lambda s, f: stop.set())
        signal.signal(signal.SIGTERM, lambda s, f: stop.set())
        try:
            work_here(args, c, study, stop)
        except (cfg.ConfigError, data.DataError, checkpoint.CheckpointError, ValueError,
                ImportError) as e:  # bad input the first trial found (its trial is queued again)
            return cli.error("tune.py", str(e))
    if args.worker:
        return 130 if stop.is_set() else 0
    from minigpt_jax.tune import outputs

    data = (["--data", args.data] if args.data is not None else []) + (
        ["--text-docs", args.text_docs] if args.text_docs != "file" else [])
    paths = outputs.write_outputs(c["out"], study, c["trials"], data)
    print(f"tune.py: study {args.study}: {c['out']}/tune_trials.txt, report.md, "
          f"{len(paths)} files", file=sys.stderr)
    best = c["out"] / "tune_best_command.txt"
    if best.exists():
        print(f"tune.py: best trial again: {best.read_text().strip()}", file=sys.stderr)
    return 130 if stop.is_set() else code


def entry() -> None:
    """The command (minigpt-tune). It leaves without the interpreter's shutdown, where
    tensorstore reads still in flight print tracebacks after the line that matters."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
