"""What the benchmarks (and the GPU check) share: arguments, the machine's description,
FLOPs and datasheet peaks, batches, the users'-shaped fake data, memory readers, interleaved
timing and the BENCHMARKS.md section writer. Nothing runs at import; JAX is imported when used.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import statistics
import sys
import time

from minigpt_jax import cli
from minigpt_jax import config as cfg
from minigpt_jax.files import atomic_path

REPO = pathlib.Path(__file__).resolve().parents[1]  # the checkout: child processes run from it

N_BATCHES = 8  # distinct batches cycled through by every contender
# Datasheet dense peaks in TFLOP/s: (bf16, tf32). JAX runs float32 matmuls as TF32 on these GPUs.
GPU_PEAKS = {"H100 SXM": (989.0, 495.0), "H100 PCIe": (756.0, 378.0), "H200": (989.0, 495.0),
             "A100": (312.0, 156.0)}


# --- arguments ---------------------------------------------------------------------------

def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is doc's first paragraph and epilog the rest (cli.parser)."""
    return cli.parser(prog, doc)


def add_common(p: argparse.ArgumentParser, set_help: str = "override a config field, e.g."
               " --set seq_len=128; repeatable") -> None:
    """--set KEY=VALUE (repeatable) and --out FILE, which every benchmark takes."""
    cli.add_overrides(p, set_help)
    p.add_argument("--out", default="BENCHMARKS.md",
                   help="markdown file whose generated section (between bench markers) is"
                        " rewritten (default: %(default)s)")


def fail(prog: str, message: str) -> None:
    """Bad input: one line naming the culprit, exit code 2."""
    raise SystemExit(cli.error(prog, message))


def command_line(prog: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, as BENCHMARKS.md quotes it (prog: the module,
    benchmarks.bench)."""
    return " ".join(["python", "-m", prog, *(sys.argv[1:] if argv is None else argv)])


def measured(prog: str, argv: list[str] | None) -> str:
    """A section's first words: when, on what, by which command."""
    m = describe_machine(tuned=False)
    return (f"Measured {time.strftime('%Y-%m-%d')} on {m['host']} ({m['kind']}, {m['versions']})"
            f" by `{command_line(prog, argv)}`")


# --- the machine -------------------------------------------------------------------------

def describe_machine(tuned: bool) -> dict:
    import jax
    dev = jax.devices()[0]
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    mem = ""
    with contextlib.suppress(OSError, StopIteration):
        kb = int(next(line.split()[1] for line in open("/proc/meminfo")
                      if line.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    versions = f"jax {jax.__version__}"
    with contextlib.suppress(ImportError):
        import torch
        versions += f", torch {torch.__version__}"
    return {"gpu": dev.platform == "gpu", "platform": dev.platform, "kind": dev.device_kind,
            "host": f"{cpu}, {os.cpu_count()} cores{mem}", "versions": versions, "tuned": tuned,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def gpu_peak(kind: str, dtype: str) -> float | None:
    """Datasheet dense peak FLOP/s for a known GPU kind (bf16, else TF32), else None."""
    k = kind.upper()
    if "H100" in k:
        name = "H100 PCIe" if "PCIE" in k else "H100 SXM"
    else:
        name = next((n for n in ("H200", "A100") if n in k), None)
    if name is None:
        return None
    bf16, tf32 = GPU_PEAKS[name]
    return (bf16 if dtype == "bfloat16" else tf32) * 1e12


def train_flops(c: cfg.Config) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), every position counted.

    Per token, forward: 2 x (matmul weights: n_layers x (4 D^2 + 2 D F) + D V), plus attention
    n_layers x 4 L D (q.k scores and probs.v over all L keys, causal mask not discounted).
    Embedding lookups, LayerNorm, softmax, GELU and AdamW are not counted.
    """
    D, F, V, L = c.embed_dim, c.ffn_dim, c.vocab_size, c.seq_len
    weights = c.n_layers * (4 * D * D + 2 * D * F) + D * V
    return 3.0 * c.batch_size * L * (2 * weights + c.n_layers * 4 * L * D)


# --- data --------------------------------------------------------------------------------

def users_shaped_lengths(tokens: int, seed: int = 0):
    """Chunk lengths shaped like the users' tokenized_data.pt: at most 512, 90% exactly 512,
    the rest 10..511, summing to exactly `tokens` (the last chunk trimmed, dropped under 10)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    n = tokens // 400 + 16
    lengths = np.where(rng.random(n) < 0.9, 512, rng.integers(10, 512, n))
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), tokens) + 1]
    lengths[-1] -= int(lengths.sum()) - tokens
    return lengths if lengths[-1] >= 10 else lengths[:-1]


def users_shaped(tokens: int, seed: int = 0):
    """A Sequences of random ids in users'-shaped chunks (`users_shaped_lengths`)."""
    import numpy as np

    from minigpt_jax.data import sequences

    lengths = users_shaped_lengths(tokens, seed)
    flat = np.random.default_rng(seed + 1).integers(0, cfg.PAD_TOKEN_ID, int(lengths.sum()),
                                                    dtype=np.int32)
    return sequences.Sequences(flat, sequences.offsets_from_lengths(lengths), "tokenized",
                               f"synthetic ({len(flat):,} tokens in {len(lengths):,} chunks)")


def make_batches(c: cfg.Config, kind: str, n_pipeline: int = 400):
    """N_BATCHES (B, L) int32 batches and the input pipeline's batches/s (corpus only).

    kind "dense": random ids without PAD, every position does full work; "corpus": the
    default corpus through the grain pipeline, as the README run reads it.
    """
    import numpy as np
    if kind == "dense":
        rng = np.random.default_rng(c.seed)
        return [rng.integers(0, cfg.PAD_TOKEN_ID, (c.batch_size, c.seq_len)).astype(np.int32)
                for _ in range(N_BATCHES)], None
    from minigpt_jax import data
    train_chunks = data.prepare(data.default_corpus(), c).train
    per_epoch = data.steps_per_epoch(len(train_chunks), c.batch_size)
    ds = data.batch_dataset(train_chunks, c.batch_size, c.seed, -(-n_pipeline // per_epoch))
    t = time.perf_counter()
    it = data.batch_iterator(ds, 0, c.num_workers)  # as the training loop reads it
    batches = [next(it) for _ in range(n_pipeline)]
    rate = n_pipeline / (time.perf_counter() - t)
    return batches[:N_BATCHES], rate


# --- memory and time ---------------------------------------------------------------------

def proc_status(key: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def interleaved(runs: dict, rounds: int) -> dict[str, list[float]]:
    """{name: run() -> seconds}: every run once per round, in turn, so that load from other
    work on the machine hits all alike -> {name: [seconds per round]}."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run())
    return times


def median(xs) -> float:
    return statistics.median(xs)


# --- BENCHMARKS.md -----------------------------------------------------------------------

def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def section_marks(name: str) -> tuple[str, str]:
    return f"<!-- bench:begin {name} -->", f"<!-- bench:end {name} -->"


def publish(path, lines: list[str]) -> int:
    """A benchmark's section into its markdown file (`write_section`) and onto stdout -> 0."""
    write_section(pathlib.Path(path), lines)
    print("\n".join(lines))
    return 0


def write_section(path: pathlib.Path, lines: list[str]) -> None:
    """Put lines (which start and end with one section's marks) in place of that section's
    old text, or append them; the rest of the file is kept. Written atomically."""
    begin, end = lines[0], lines[-1]
    text = "\n".join(lines)
    path = pathlib.Path(path)
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        text = old[:old.index(begin)] + text + old[old.index(end) + len(end):]
    elif old:
        text = old.rstrip() + "\n\n" + text + "\n"
    else:
        text = "# Benchmarks\n\n" + text + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
