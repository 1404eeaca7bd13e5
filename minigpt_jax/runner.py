"""The run as a library call: what `scripts/run.py`'s flags say, from Python.

    from minigpt_jax import runner
    results = runner.run()                                  # the five experiments, into outcome/
    results = runner.run(["baseline"], max_steps=20, overrides={"lr": 3e-4}, out="/tmp/try")

`run` is three steps, each also callable on its own: `plan` (the experiments: names,
overrides, sweeps -> configs), `check` (the options.RunOptions: counts, the output folder),
both without JAX, then `execute`, which validates what needs JAX and the data (devices, the
data, schedules, resumable checkpoints), trains (parallel.run_all: experiments on distinct
devices at the same time), and writes the per-experiment curves as each finishes and the
comparison plots, results table and report.md at the end. Errors are the project's own, one
line each: `RunError` (a usage error), config.ConfigError, data's DataError,
checkpoint.CheckpointError. It returns one loop.Result per experiment, in order.

Process set-up that must come before JAX starts (which GPUs are visible,
jax.distributed) is the caller's: scripts/run.py does it, between `check` and `execute`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from minigpt_jax import config as cfg
from minigpt_jax.options import RunOptions

REPO_OUT = pathlib.Path(__file__).resolve().parents[1] / "outcome"


class RunError(ValueError):
    """A request that cannot run as given (a usage error); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The runs: name -> (config, override text); with several seeds, each run's experiment."""

    experiments: dict[str, tuple[cfg.Config, str]]
    groups: dict[str, str] = dataclasses.field(default_factory=dict)  # run -> its experiment

    def experiment(self, run: str) -> str:
        """The experiment a run belongs to ("" when it is one seed: the run is the experiment)."""
        return self.groups.get(run, "")

    @property
    def configs(self) -> dict[str, cfg.Config]:
        return {name: c for name, (c, _) in self.experiments.items()}


def plan(experiments: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None,
         sweeps: Sequence = (), override_text: str = "", seeds: int = 1) -> Plan:
    """Everything that needs no JAX -> a Plan; RunError or ConfigError when it cannot run.

    experiments: names from config.EXPERIMENTS (default: all five, or baseline with sweeps).
    sweeps: config.parse_sweeps' output ([(key, [(text, value), ...]), ...]). seeds: each
    experiment trained with seeds seed .. seed+seeds-1, as runs named <experiment>_seed<s>
    (one seed: the experiment's own name, today's run)."""
    names = list(experiments) if experiments is not None else (["baseline"] if sweeps else list(cfg.EXPERIMENTS))
    if not names:
        raise RunError("no experiment given; valid: " + ", ".join(cfg.EXPERIMENTS))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RunError(f"experiments {', '.join(dupes)} given twice")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise RunError(f"--seeds {seeds!r}: expected a positive integer (1: one run per experiment)")
    experiments = cfg.plan(names, dict(overrides or {}), override_text, list(sweeps))
    if seeds == 1:
        return Plan(experiments)
    runs, groups = {}, {}
    for name, (c, text) in experiments.items():
        if c.seed + seeds - 1 >= 2**32:
            raise RunError(f"--seeds {seeds}: {name}'s seeds {c.seed}..{c.seed + seeds - 1} leave"
                           " [0, 2**32); expected a smaller seed or count")
        for s in range(c.seed, c.seed + seeds):
            runs[f"{name}_seed{s}"] = (c.replace(seed=s), ", ".join(filter(None, [text, f"seed={s}"])))
            groups[f"{name}_seed{s}"] = name
    return Plan(runs, groups)


def check(opts: RunOptions, p: Plan | None = None) -> None:
    """RunError, before JAX starts, for options that cannot run: counts, the text mode, the
    reference experiment (one of the plan's), the output folder."""
    if p is not None and opts.reference is not None:
        names = list(dict.fromkeys(p.experiment(r) or r for r in p.experiments))
        if opts.reference not in names:
            raise RunError(f"--reference {opts.reference}: not an experiment of this run;"
                           f" expected one of {', '.join(names)}")
    m = opts.max_steps
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m <= 0):
        raise RunError(f"max_steps={m!r}: expected a positive integer")
    c = opts.concurrent
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise RunError(f"--concurrent {c!r}: expected a positive integer")
    if opts.text_docs not in ("file", "block"):
        raise RunError(f"--text-docs {opts.text_docs!r}: expected file (one document per file) or"
                       " block (one per blank-line-separated block)")
    check_out_dir(opts.out)


def experiment_names(only: str | None = None, experiments: str | None = None,
                     sweeps: Sequence = ()) -> list[str] | None:
    """run.py's --only NAME|all (the PyTorch project's flag) or --experiments A,B -> names;
    None: the default (all five; baseline with sweeps)."""
    if only is not None and experiments is not None:
        raise RunError("--only and --experiments both given; expected one of them")
    flag, text = ("--only", only) if only is not None else ("--experiments", experiments)
    if text is None:
        return None
    if flag == "--only" and text.strip() == "all":
        return list(cfg.EXPERIMENTS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise RunError(f"{flag} is empty; valid: all, " + ", ".join(cfg.EXPERIMENTS))
    if flag == "--only" and len(names) > 1:
        raise RunError(f"--only {only!r}: expected one experiment name or 'all'"
                       " (use --experiments for a list)")
    return names


def positive_int(flag: str, text: str | None) -> int | None:
    """A flag's positive integer (None stays None), or RunError."""
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        raise RunError(f"{flag} {text!r}: expected a positive integer") from None
    if n <= 0:
        raise RunError(f"{flag} {n}: must be a positive integer")
    return n


def wandb_writers(project: str | None) -> Callable | None:
    """experiment -> [a W&B run named after it] (needs the wandb package), or None."""
    if project is None:
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise RunError(f"--wandb {project}: the wandb package is not installed;"
                       " expected pip install wandb, or no --wandb") from None
    from minigpt_jax import metrics

    return lambda e: [metrics.WandbWriter(project=project, name=e.name, config=e.config.to_dict())]


def check_out_dir(out: pathlib.Path) -> None:
    """The output folder, or the part of its path that exists, must take a new entry. Tried
    for real, leaving nothing: root passes every permission check, yet /proc or a read-only
    mount still refuse."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"--out {out}: {probe} is not a folder; expected a writable folder")
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".run-py-write-test-").cleanup()
    except OSError as e:
        raise RunError(f"--out {out}: cannot create anything in {probe} ({e.strerror});"
                       " expected a writable folder") from None


def load_data(path, vocab_sizes: Sequence[int], text_docs: str = "file",
              readers=None, cache: bool = True):
    """The training data once (data.load; readers: data.Readers), checked for every vocabulary
    the experiments use."""
    from minigpt_jax import data

    vocab_sizes = sorted(set(vocab_sizes))
    seqs = data.load(path, vocab_sizes[-1], text_docs, readers or data.Readers(), cache)
    for vocab_size in vocab_sizes[:-1]:
        seqs.check(vocab_size)  # a smaller vocabulary than the largest is checked once more
    return seqs


def _check(plan_: Plan, seqs, opts: RunOptions) -> dict:
    """What the data and checkpoints decide, before any training -> the seconds that
    splitting and segmenting took, per data setting (data.prepare_key)."""
    from minigpt_jax import checkpoint, data, optim

    seconds = {}
    for name, c in plan_.configs.items():
        t = time.perf_counter()
        prepared = data.prepare(seqs, c)  # once per data setting, shared by those that agree
        seconds.setdefault(data.prepare_key(c), time.perf_counter() - t)
        total = data.steps_per_epoch(len(prepared.train), c.batch_size) * c.max_epochs
        try:
            optim.lr_shape(c, min(total, opts.max_steps or total))  # the schedule fits the run
        except cfg.ConfigError as e:
            raise RunError(f"{name}: {e}") from None
    if opts.resume:
        try:
            checkpoint.check_resumable(opts.out, plan_.configs, seqs.fingerprint, seqs.source)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"--resume: {e}") from None
    return seconds


def run(experiments: Sequence[str] | None = None, *, overrides: Mapping[str, Any] | None = None,
        sweeps: Sequence = (), override_text: str = "", seeds: int = 1, out=REPO_OUT,
        **options) -> list:
    """Train the experiments and write their outputs under `out` -> one loop.Result each.

    experiments: names from config.EXPERIMENTS (default: all five, or baseline with sweeps);
    overrides: field -> value for every experiment; sweeps: config.parse_sweeps' output;
    seeds: each experiment trained with this many seeds (plan), stacked on its device unless
    seeds_apart.
    The other keyword arguments are options.RunOptions' fields, among them: data (a path;
    default the embedded corpus), devices (indices into jax.devices(), the PyTorch project's
    --devices rule; default all on the first device), max_steps, resume, stack, data_parallel,
    concurrent (up to this many experiments at the same time on each device), text_docs,
    cache (read a .pt source through the token cache, data/token_cache.py), init_from (a
    local Hugging Face GPT-2 folder every experiment starts from; read_bin reads its
    pytorch_model.bin, if that is what it holds), export_hf (write <out>/hf/<name>/ as each
    experiment finishes), writers (experiment -> extra metric writers, e.g. W&B), read_pt
    (path, vocab_size -> the .pt data: torch_compat.read_sequences) and read_bin
    (torch_compat.read_numpy_state_dict: the library never imports torch_compat, so without
    them a .pt or .bin is a one-line error), on_result (called as each experiment finishes,
    after its curves), stop (set it to save and stop every experiment at its next block),
    gpu_index (host.restrict_gpus' map), command (for the report).
    """
    p = plan(experiments, overrides, sweeps, override_text, seeds)
    opts = RunOptions(out=out, **options)
    check(opts, p)
    return execute(p, opts)


def execute(p: Plan, opts: RunOptions) -> list:
    """The run of a plan whose options passed `check`: devices, data, the checks that need
    them, training and the outputs -> one loop.Result per experiment."""
    params, notes = {}, []
    if opts.init_from is not None:
        p, params, notes = _init_from(p, opts.init_from, opts.readers)
    import jax

    from minigpt_jax import loop, placement

    lead = jax.process_index() == 0
    devices = None if opts.devices is None else ",".join(map(str, opts.devices))
    owners = list(dict.fromkeys(p.experiment(r) or r for r in p.experiments))  # seeds share one
    try:
        lists, notice = placement.parse_devices(devices, len(owners), opts.data_parallel,
                                                opts.gpu_index)
    except ValueError as e:
        raise RunError(str(e)) from None
    lists = [lists[owners.index(p.experiment(r) or r)] for r in p.experiments]
    if notice and lead:
        tqdm.write(f"run.py: {notice}", file=sys.stderr)
    for note in notes if lead else ():
        tqdm.write(f"--init-from {opts.init_from}: {note}", file=sys.stderr)
    t = time.perf_counter()
    seqs = load_data(opts.data, [c.vocab_size for c in p.configs.values()], opts.text_docs,
                     opts.readers, opts.cache)
    data_seconds = time.perf_counter() - t
    exps = [loop.Experiment(name, c, devs, text, params=params.get(name), data_id=seqs.fingerprint,
                            experiment=p.experiment(name))
            for (name, (c, text)), devs in zip(p.experiments.items(), lists)]  # batch splits
    segment_seconds = _check(p, seqs, opts)
    if lead:  # after the checks: bad input stays one line
        tqdm.write(f"data: {seqs.describe()}, read and checked in {data_seconds:.1f} s; split and"
                   f" segmented in {sum(segment_seconds.values()):.1f} s", file=sys.stderr)
    phases = {"data": data_seconds, "segment": segment_seconds}
    return _train(exps, seqs, opts, phases, lead)


def _init_from(p: Plan, hf_dir, readers) -> tuple[Plan, dict, list[str]]:
    """The plan with the folder's model shape and its initial params (hf.init_from)."""
    from minigpt_jax import hf

    try:
        configs, params, notes = hf.init_from(hf_dir, p.configs, readers)
    except hf.HFError as e:  # every HFError of a folder starts with the folder's path
        raise hf.HFError(f"--init-from {e}") from None
    experiments = {name: (configs[name], ", ".join(filter(None, [text, f"init from {hf_dir}"])))
                   for name, (_, text) in p.experiments.items()}
    return Plan(experiments, p.groups), params, notes


def _export_hf(out: pathlib.Path, r, seqs, command: str | None) -> None:
    """<out>/hf/<name>/: the experiment as a GPT2LMHeadModel folder, or one line why not."""
    import jax

    from minigpt_jax import hf

    if r.state is None:
        return
    try:
        card = hf.run_card(r.name, r.rows, r.val_rows, data=seqs.describe(), command=command,
                           status=r.status)
        hf.export(jax.device_get(r.state.params), r.config, out / "hf" / r.name, card)
    except (hf.HFError, OSError) as e:
        tqdm.write(f"{r.name}: no hf/{r.name}/ ({e})", file=sys.stderr)


def _train(exps, seqs, opts: RunOptions, phases: dict, lead: bool) -> list:
    from minigpt_jax import data, parallel, plots, report, seeds, tables

    out = opts.out

    def finished(r) -> None:
        """Curves, then the exports, of an experiment as soon as it finishes."""
        t = time.perf_counter()
        r.phases["data"] = phases["data"]
        # segmented in the checks; a worker's own prepare (memoised, or again if evicted) adds
        r.phases["segment"] = (phases["segment"].get(data.prepare_key(r.config), 0.0)
                               + r.phases.get("segment", 0.0))
        if lead and r.rows:
            plots.plot_experiment(out, r.name, r.rows, r.val_rows)
        if lead and opts.export_hf:
            _export_hf(out, r, seqs, opts.command)
        if lead and opts.on_result is not None:
            opts.on_result(r)
        r.phases["outputs"] = time.perf_counter() - t

    if lead:
        tqdm.write(f"run.py: {len(exps)} experiment(s) on {seqs.describe()}; writing to {out}", file=sys.stderr)
    results = parallel.run_all(exps, lambda c: data.prepare(seqs, c), opts.replace(on_result=finished))
    if lead:
        t = time.perf_counter()
        curves = seeds.curves(results)  # experiment -> [(rows, val_rows) of each seed]
        plots.plot_comparison(out, curves)
        for name, runs in curves.items():
            if len(runs) > 1:  # the experiment's mean over seeds, with its band
                plots.plot_seeds(out, name, runs)
        tables.write_results(out, results, opts.reference)
        command = f"`{opts.command}`" if opts.command else "runner.run from Python"
        report.write_report(out, results, report.data_statistics(seqs, results),
                            report.source_text(seqs),
                            {"Command": command, "Resumed": "yes" if opts.resume else "no",
                             "Stacked": "yes" if opts.stack else "no"}, reference=opts.reference)
        for r in results:
            r.phases["outputs"] = r.phases.get("outputs", 0.0) + time.perf_counter() - t
            tqdm.write(f"  {r.name:<14} {r.status}; " + ", ".join(
                f"{k} {r.phases[k]:.1f} s" for k in report.PHASES if k in r.phases), file=sys.stderr)
    return results
