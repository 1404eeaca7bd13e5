"""Benchmark the JAX training step against the PyTorch reference, in one process, same batches.

Contenders (--contenders):
  jax            train_step, one dispatch per step, metrics read once per block
  jax_fused      train_steps: a block of K steps in one dispatch (lax.scan)
  torch          torch_compat.reference + torch.optim.AdamW, eager (its train_step reads the
                 loss every step)
  torch_compile  the same with model and loss under torch.compile ("failed: ..." if it does
                 not build)

Configs (--configs) are experiment names (config.EXPERIMENTS) with optional
overrides and batch kind: `baseline`, `baseline@dense`, `baseline:dtype=bfloat16`.
`@corpus` batches (the default) come from the default corpus through the grain
pipeline, as in the README run (about a third of the labels are PAD); `@dense`
batches are random ids without PAD, so every position does full work. Every
contender starts from the same parameters and sees the same batches; contenders
run in interleaved rounds, so a machine shared with other work slows all alike.
The data path has its own benchmark: benchmarks/bench_startup.py.

Examples:
  python -m benchmarks.bench                      # the full table -> BENCHMARKS.md
  python -m benchmarks.bench --configs baseline --contenders jax,torch --rounds 3 --out /tmp/b.md
"""

from __future__ import annotations

import pathlib
import sys

from benchmarks import benchlib
from benchmarks import contenders as cons
from minigpt_jax import config as cfg

DEFAULT_CONFIGS = ("baseline@dense,baseline,baseline:dtype=bfloat16,lr_1e-3,batch_size_16,"
                   "n_layers_1,embed_dim_64")
PROG = "benchmarks.bench"


def parse_args(argv=None):
    p = benchlib.parser(PROG, __doc__)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated NAME[:key=value...][@corpus|@dense]"
                        " (default: %(default)s)")
    p.add_argument("--contenders", default=",".join(cons.CONTENDERS),
                   help="comma-separated subset of: %(default)s")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds; every contender times one block per round"
                        " (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per JAX block, also jax_fused's K (default: 4 on CPU, 50 on GPU)")
    p.add_argument("--torch-steps", type=int, default=None,
                   help="steps per PyTorch block (default: 1 on CPU, 20 on GPU)")
    benchlib.add_common(p, "override a config field in every config, e.g. --set seq_len=128;"
                        " repeatable")
    p.add_argument("--section", default="main",
                   help="name of the generated section to rewrite, so several runs share one file"
                        " (default: %(default)s)")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="keep glibc's default allocator (otherwise host.tune_host_allocator, for"
                        " all contenders)")
    return p.parse_args(argv)


def parse_configs(text: str, overrides: dict) -> list[tuple[str, str, cfg.Config]]:
    """'baseline:dtype=bfloat16@dense' -> [(label, batch kind, Config)]; ConfigError on bad
    input."""
    out = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        body, _, kind = spec.partition("@")
        if kind not in ("", "corpus", "dense"):
            raise cfg.ConfigError(f"--configs {spec!r}: the batch kind must be @corpus or @dense")
        name, *items = body.split(":")
        c = cfg.experiment_config(name, {**overrides, **cfg.parse_overrides(items)})
        out.append((spec, kind or "corpus", c))
    if not out:
        raise cfg.ConfigError("--configs is empty; experiments: " + ", ".join(cfg.EXPERIMENTS))
    return out


def check(args) -> tuple[list, list[str]]:
    """The configs and contenders the flags name; ConfigError on bad input."""
    if args.section == "data":
        raise cfg.ConfigError("--section data: the data benchmark moved to"
                              " `python -m benchmarks.bench_startup`")
    configs = parse_configs(args.configs, cfg.parse_overrides(args.overrides))
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if not names or set(names) - set(cons.CONTENDERS):
        raise cfg.ConfigError(f"--contenders {args.contenders!r}: choose from"
                              f" {', '.join(cons.CONTENDERS)}")
    if not args.section.replace("-", "").replace("_", "").isalnum():
        raise cfg.ConfigError(f"--section {args.section!r}: use letters, digits, - and _")
    for flag, value in (("--rounds", args.rounds), ("--steps", args.steps),
                        ("--torch-steps", args.torch_steps)):
        if value is not None and value <= 0:
            raise cfg.ConfigError(f"{flag} {value}: must be a positive integer")
    return configs, [n for n in cons.CONTENDERS if n in names]  # JAX first: torch starts from it


def header(section, machine, ceiling, command, block, torch_block, rounds) -> list[str]:
    best = max(ceiling.values())
    unit, scale = ("TFLOP/s", 1e12) if machine["gpu"] else ("GFLOP/s", 1e9)
    tuned = ("tuned (`host.tune_host_allocator()`, every contender)" if machine["tuned"]
             else "glibc default")
    return [
        *benchlib.section_marks(section)[:1], f"### Measured: {section}", "",
        f"- Machine: {machine['host']}; JAX device `{machine['platform']}` ({machine['kind']});"
        f" {machine['versions']}.",
        f"- Host allocator: {tuned}; XLA_FLAGS: `{machine['xla_flags'] or '(none)'}`.",
        f"- Command: `{command}`",
        f"- Ceiling: float32 {8192 if machine['gpu'] else 4096}^3 matmul, timed every round: "
        + ", ".join(f"{k} {v / scale:.1f} {unit}" for k, v in ceiling.items())
        + f"; the best, {best / scale:.1f} {unit}, is the ceiling.",
        f"- Median step time over {rounds} interleaved rounds of {block} JAX steps (jax_fused:"
        f" one dispatch of K={block}) and {torch_block} PyTorch step(s); warm-up and"
        " compilation excluded.",
        "- FLOPs per step: `3 * B * L * (2 * (n_layers * (4 D^2 + 2 D F) + D V) + n_layers * 4 L"
        " D)` (forward + backward = 3x forward; every position counted, the causal half of"
        " attention too).",
        "- On `@corpus` batches the JAX step skips the LM head for PAD labels, so its FLOP/s (the"
        " formula over every position) is an effective rate that can pass the ceiling; `@dense`"
        " rows measure how close the step runs to the hardware.",
        "- tokens/s = B x L / step time. Peak memory: JAX, XLA's buffers for the step (arguments"
        " + outputs - donated + temporaries); PyTorch, the allocator's peak over one step (CPU:"
        " profiler memory timeline).",
        "- Input pipeline: the grain iterator's batches/s over 400 batches (thread start"
        " included), as a multiple of the JAX step rate.",
        "",
        f"| config | contender | step ms | tokens/s | x torch eager | {unit} | % of ceiling | MFU"
        " | peak MB | first loss | pipeline x step | warm-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]


def table_row(r: dict, best: float, scale: float) -> str:
    """One contender's row of the Measured table."""
    fmt = benchlib.fmt
    if "failed" in r:
        return f"| {r['config']} | {r['contender']} | {r['failed']} | | | | | | | | | " \
               f"{r['warmup_s']:.0f} |"
    return (f"| {r['config']} | {r['contender']} | {1e3 * r['step_s']:.1f} | {r['tokens_s']:,.0f}"
            f" | {fmt(r['vs_eager'], '.2f')} | {r['flops_s'] / scale:.1f}"
            f" | {100 * r['flops_s'] / best:.0f}% | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}"
            f" | {fmt(r['peak_bytes'] and r['peak_bytes'] / 2**20, '.0f')}"
            f" | {r['first_loss']:.4f} | {fmt(r['pipeline_x'], ',.0f')} | {r['warmup_s']:.0f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        configs, names = check(args)
    except cfg.ConfigError as e:
        benchlib.fail(PROG, str(e))
    # Before JAX or PyTorch allocate anything; process-wide, so PyTorch runs with it too.
    import jax

    from minigpt_jax import host
    tuned = not args.no_tune_allocator and host.tune_host_allocator(jax.default_backend())
    machine = benchlib.describe_machine(tuned)
    block = args.steps or (50 if machine["gpu"] else 4)
    torch_block = args.torch_steps or (20 if machine["gpu"] else 1)
    with_torch = any(n.startswith("torch") for n in names)
    if with_torch:
        try:
            import torch
        except ImportError:
            benchlib.fail(PROG, "PyTorch is not installed; install the [torch] extra or pass"
                          " --contenders jax,jax_fused")
        if machine["gpu"]:
            torch.set_float32_matmul_precision("high")  # TF32, as JAX's float32 matmuls on GPU
    ceiling = cons.Ceiling(machine["gpu"], with_torch)
    rows = []
    for label, kind, c in configs:
        rows += cons.measure_config(label, kind, c, names, args.rounds, block, torch_block,
                                    ceiling, machine, progress=lambda m: print(m, file=sys.stderr))
    flops = ceiling.flops()
    lines = header(args.section, machine, flops, benchlib.command_line(PROG, argv), block,
                   torch_block, args.rounds)
    scale = 1e12 if machine["gpu"] else 1e9
    lines += [table_row(r, max(flops.values()), scale) for r in rows]
    lines += ["", benchlib.section_marks(args.section)[1]]
    benchlib.write_section(pathlib.Path(args.out), lines)
    print(f"{PROG}: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
