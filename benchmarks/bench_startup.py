"""Time to first step, whole-run time and peak memory of scripts/run.py at the users' size.

For each size (--sizes), a tokenized_data.pt shaped like the users' data (a
torch.save'd list of int64 1-D tensors, chunks of up to 512 random ids, 90%
exactly 512; benchlib.users_shaped_lengths) is generated once into --data-dir
and reused after. Then, each in a fresh process of
`scripts/run.py --only baseline --max-steps N` with a tiny model (--set) and a
private XDG_CACHE_HOME (its token cache emptied first; the XLA compilation
cache is shared by all runs and warmed first, so compile times are alike):
  cold      the first run: torch.load, the checks and the token cache's write
  warm      the second run: the cache entry memory-mapped and verified
  no-cache  --no-cache: torch.load and the checks, every run
  prepared  --data on a folder written by scripts/prepare_data.py (timed too)
and, once, `corpus`: the same run on the embedded default corpus (98k tokens),
whose peak RSS is what every run pays before any data: the interpreter, JAX,
the library, the compiled programs.

Per run: start-up (process start to the first step's dispatch, compilation
excluded: the moment the run prints "step program traced and compiled in X s",
less X), compile seconds, total wall seconds, peak RSS (wait4's ru_maxrss, the
process and its waited-for children) and its excess over the corpus run,
against the target of 2 x N x 4 bytes for N tokens (with the cache; BENCHMARKS.md, "Time to
first step and memory at the users' size").
Also each run's own phase line (data, segment, compile, train, final_eval,
outputs), and a check that every long phase printed its line. The modes run a
tiny model (the data is what they measure); the smoke runs are that section's
other target: baseline with every default as shipped (the 200-batch final evaluation
included), on the embedded corpus and on each size with a warm cache.

Examples:
  python -m benchmarks.bench_startup                  # 10M and 100M -> BENCHMARKS.md
  python -m benchmarks.bench_startup --sizes 1M --out /tmp/b.md
  python -m benchmarks.bench_startup --sizes 10M,100M --data-dir /var/tmp/bench_data --steps 10
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import benchlib

REPO = benchlib.REPO
PROG = "benchmarks.bench_startup"
SECTION = "startup"
# Data, not the model, is what is measured. A 20-batch final evaluation: the shipped 200 cost
# about a second each on a 2-core CPU, whatever the data (override with --set).
TINY = ["embed_dim=32", "n_heads=2", "n_layers=1", "eval_final_batches=20"]
MODES = ("cold", "warm", "no-cache", "prepared")
# The lines a run prints for its long phases
PHASE_LINES = {"data": r"^data: .* read and checked in", "segment": r"split and segmented in",
               "compile": r"step program traced and compiled in", "final_eval": r"final evaluation",
               "phases": r"^\s+baseline\s+\S+; data "}
# The data phase alone, in a fresh process: runner.load_data with and without the token cache
LOAD = """
import sys, time
import torch_compat
from minigpt_jax import runner
t = time.perf_counter()
runner.load_data(sys.argv[1], [50257], readers=torch_compat.readers(),
                 cache=sys.argv[2] == "cold")
print(f"load {time.perf_counter() - t:.3f}")
"""


def load_rounds(pt: pathlib.Path, env: dict, work: pathlib.Path, rounds: int) -> dict:
    """The first read with the cache (cold: torch.load, checks, the entry written) against
    --no-cache's, alternated in fresh processes, each cold one with an empty cache ->
    {"cold": [s, ...], "no-cache": [s, ...]}."""
    times = {"cold": [], "no-cache": []}
    for i in range(rounds):
        for mode in times:
            cache = work / f"load-cache-{i}"
            r = measure([sys.executable, "-c", LOAD, str(pt), mode],
                        {**env, "XDG_CACHE_HOME": str(cache)})
            shutil.rmtree(cache, ignore_errors=True)
            got = [ln for _, ln in r["lines"] if ln.startswith("load ")]
            if r["rc"] != 0 or not got:
                benchlib.fail(PROG, f"loading {pt} ({mode}) failed: {r['lines'][-1:]}")
            times[mode].append(float(got[-1].split()[1]))
    return times


def parse_size(text: str) -> int:
    """'10M', '1.5M', '500k', '2000000' -> tokens."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    t = text.strip().lower()
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        benchlib.fail(PROG, f"--sizes {text!r}: expected token counts such as 10M,100M")
    if n < 10_000:
        benchlib.fail(PROG, f"--sizes {text!r}: expected at least 10k tokens")
    return int(n)


def parse_args(argv=None):
    p = benchlib.parser(PROG, __doc__)
    p.add_argument("--sizes", default="10M,100M", help="token counts, comma-separated"
                   " (k, M, G suffixes; default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="--max-steps of each run (default: 10)")
    p.add_argument("--load-rounds", type=int, default=3, help="alternated rounds of the data"
                   " phase alone, cold vs --no-cache, in fresh processes (default: %(default)s)")
    p.add_argument("--no-smoke", action="store_true", help="leave out the smoke runs: baseline"
                   " with every default as shipped, on the corpus and on each size, cached")
    p.add_argument("--data-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "bench_startup"),
                   help="where the generated .pt files (reused when present), the prepared"
                        " folders and the runs' caches live (default: %(default)s)")
    benchlib.add_common(p, "override a config field of every run (after the tiny model: "
                        + " ".join(f"--set {s}" for s in TINY) + "); repeatable")
    args = p.parse_args(argv)
    args.tokens = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    return args


# --- data --------------------------------------------------------------------------------

def users_pt(tokens: int, folder: pathlib.Path) -> pathlib.Path:
    """folder/<tokens>/tokenized_data.pt, generated once: one int64 tensor (own storage) per
    chunk, as the users' file holds them."""
    file = folder / f"{tokens}" / "tokenized_data.pt"
    if file.is_file():
        return file
    import numpy as np
    import torch

    from minigpt_jax import config as cfg
    from minigpt_jax.files import atomic_path

    t = time.perf_counter()
    lengths = benchlib.users_shaped_lengths(tokens)
    rng = np.random.default_rng(1)
    chunks = [torch.from_numpy(rng.integers(0, cfg.PAD_TOKEN_ID, int(n), dtype=np.int64))
              for n in lengths]
    with atomic_path(file) as tmp:
        torch.save(chunks, tmp)
    print(f"{PROG}: wrote {file} ({tokens:,} tokens in {len(chunks):,} chunks,"
          f" {file.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)
    return file


def prepared_dir(pt: pathlib.Path, out: pathlib.Path, env: dict) -> tuple[pathlib.Path, float]:
    """pt prepared into the new folder out by scripts/prepare_data.py -> (out, seconds)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), str(pt), str(out)],
                   check=True, env=env)
    return out, time.perf_counter() - t


# --- one measured process ----------------------------------------------------------------

def measure(cmd: list[str], env: dict) -> dict:
    """Run cmd; time-stamp every line it prints (\\n or \\r ends one) -> wall seconds, peak RSS
    (bytes), exit code and [(seconds since start, line)]."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    lines, buf = [], b""
    while chunk := proc.stdout.read1(1 << 16):
        buf += chunk
        *done, buf = re.split(rb"[\r\n]", buf)
        now = time.perf_counter() - t0
        lines += [(now, d.decode(errors="replace")) for d in done if d.strip()]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if buf.strip():
        lines.append((time.perf_counter() - t0, buf.decode(errors="replace")))
    return {"wall": time.perf_counter() - t0, "rss": usage.ru_maxrss * 1024,
            "rc": proc.returncode, "lines": lines}


def first_step(lines) -> tuple[float | None, float | None]:
    """-> (start-up seconds, compile seconds): when the compile line came, less its seconds."""
    for at, line in lines:
        m = re.search(r"step program traced and compiled in ([\d.]+) s", line)
        if m:
            return at - float(m.group(1)), float(m.group(1))
    return None, None


def phase_line(lines) -> str:
    return next((ln.strip() for _, ln in reversed(lines) if re.search(PHASE_LINES["phases"], ln)),
                "")


def missing_lines(lines) -> list[str]:
    """The long phases that printed no line."""
    return [k for k, pat in PHASE_LINES.items() if not any(re.search(pat, ln) for _, ln in lines)]


def run_py(data: pathlib.Path | None, extra: list[str], sets: list[str], steps: int, env: dict,
           out: pathlib.Path) -> dict:
    cmd = [sys.executable, str(REPO / "scripts" / "run.py"), "--only", "baseline", "--max-steps",
           str(steps), "--out", str(out), *extra]
    if data is not None:
        cmd += ["--data", str(data)]
    for s in sets:
        cmd += ["--set", s]
    r = measure(cmd, env)
    shutil.rmtree(out, ignore_errors=True)
    if r["rc"] != 0:
        tail = "\n".join(ln for _, ln in r["lines"][-5:])
        benchlib.fail(PROG, f"{' '.join(cmd)} exited {r['rc']}:\n{tail}")
    r["startup"], r["compile"] = first_step(r["lines"])
    r["phases"] = phase_line(r["lines"])
    r["missing"] = missing_lines(r["lines"])
    return r


def bench_size(tokens: int, args, sets: list[str], base_env: dict, work: pathlib.Path) -> dict:
    """The four modes over one size's .pt -> {mode: measurement}."""
    pt = users_pt(tokens, pathlib.Path(args.data_dir))
    cache = work / f"cache-{tokens}"
    env = {**base_env, "XDG_CACHE_HOME": str(cache)}
    shutil.rmtree(cache / "minigpt_jax" / "tokens", ignore_errors=True)  # the first run is cold
    with open(pt, "rb") as f:  # the file in the OS page cache for every mode alike, the first too
        while f.read(1 << 24):
            pass
    runs = {}
    for mode in MODES:
        extra, data = (["--no-cache"] if mode == "no-cache" else []), pt.parent
        if mode == "prepared":
            data, seconds = prepared_dir(pt, work / f"prepared-{tokens}", env)
            runs["prepare_data.py"] = seconds
        runs[mode] = run_py(data, extra, sets, args.steps, env, work / "out")
        _progress(f"{tokens:,} tokens, {mode}", runs[mode])
    runs["load"] = load_rounds(pt, env, work, args.load_rounds)
    print(f"{PROG}: {tokens:,} tokens, data load alone, cold vs --no-cache: {runs['load']}",
          file=sys.stderr)
    if not args.no_smoke:  # the smoke target: baseline, every default as shipped, cached
        runs["smoke"] = run_py(pt.parent, [], args.overrides, args.steps, env, work / "out")
        _progress(f"{tokens:,} tokens, smoke run (shipped defaults, cached)", runs["smoke"])
    return runs


def _progress(what: str, r: dict) -> None:
    print(f"{PROG}: {what}: start-up {benchlib.fmt(r['startup'], '.1f')} s, wall {r['wall']:.1f} s,"
          f" peak RSS {r['rss'] / 2**20:,.0f} MiB; {r['phases']}", file=sys.stderr)


# --- the table ---------------------------------------------------------------------------

def table(results: dict, corpus: dict, smoke: dict | None, steps: int) -> list[str]:
    base = corpus["rss"]
    out = [f"The same run on the embedded corpus (98k tokens): start-up"
           f" {benchlib.fmt(corpus['startup'], '.1f')} s, wall {corpus['wall']:.1f} s, peak RSS"
           f" {base / 2**20:,.0f} MiB (the interpreter, JAX, the library and the compiled"
           " programs: the base every run pays before any data).", "",
           "| tokens | run | start-up s | compile s | wall s | peak RSS MiB"
           " | above the corpus run MiB | target 2xNx4 MiB | phases (s) |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for tokens, runs in results.items():
        target = 2 * tokens * 4 / 2**20
        for mode in MODES:
            r = runs[mode]
            phases = _phases(r)
            out.append(f"| {tokens / 1e6:,.0f}M | {mode} | {benchlib.fmt(r['startup'], '.1f')} |"
                       f" {benchlib.fmt(r['compile'], '.1f')} | {r['wall']:.1f} |"
                       f" {r['rss'] / 2**20:,.0f} | {(r['rss'] - base) / 2**20:,.0f} |"
                       f" {target:,.0f} | {phases} |")
    out.append("")
    for tokens, runs in results.items():
        cold, warm = runs["cold"], runs["warm"]
        above = (warm["rss"] - base) / (2 * tokens * 4)
        gaps = sorted({k for m in MODES for k in runs[m]["missing"]})
        out.append(f"- {tokens / 1e6:,.0f}M: cold / warm start-up"
                   f" {_ratio(cold['startup'], warm['startup'])}; warm RSS above the corpus run"
                   f" {100 * above:.0f}% of 2xNx4; warm wall {warm['wall'] - corpus['wall']:+.1f} s"
                   f" vs the corpus run; prepare_data.py {runs['prepare_data.py']:.1f} s;"
                   f" phase lines missing: {', '.join(gaps) or 'none'}")
        load = runs["load"]
        out.append(f"- {tokens / 1e6:,.0f}M: the data phase alone (runner.load_data in fresh"
                   f" processes, alternated): cold {_seconds(load['cold'])}, --no-cache"
                   f" {_seconds(load['no-cache'])}; median cold / no-cache"
                   f" {benchlib.median(load['cold']) / benchlib.median(load['no-cache']):.2f}x")
        if smoke is not None and "smoke" in runs:
            r = runs["smoke"]
            out.append(f"- {tokens / 1e6:,.0f}M: {steps}-step smoke run at baseline, every"
                       f" default as shipped, cached: wall {r['wall']:.1f} s vs"
                       f" {smoke['wall']:.1f} s on the embedded corpus,"
                       f" {r['wall'] - smoke['wall']:+.1f} s (target at most +60 s);"
                       f" {_phases(r)}")
    return out


def _seconds(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs) + " s"


def _phases(r: dict) -> str:
    """The run's phase line without its name and status."""
    return re.sub(r"^\S+\s+\S+;\s*", "", r["phases"]) or "-"


def _ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.1f}x ({a:.1f} s / {b:.1f} s)"


def main(argv=None) -> int:
    args = parse_args(argv)
    sets = TINY + args.overrides
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_startup-", dir=args.data_dir
                                         if pathlib.Path(args.data_dir).is_dir() else None))
    base_env = {**os.environ, "PYTHONPATH": str(REPO),
                "JAX_COMPILATION_CACHE_DIR": str(work / "xla")}
    try:
        env = {**base_env, "XDG_CACHE_HOME": str(work / "cache-corpus")}
        run_py(None, [], sets, args.steps, env, work / "out")  # warms the compilation cache
        corpus = run_py(None, [], sets, args.steps, env, work / "out")
        smoke = None
        if not args.no_smoke:
            run_py(None, [], args.overrides, args.steps, env, work / "out")  # compiles baseline
            smoke = run_py(None, [], args.overrides, args.steps, env, work / "out")
            _progress("embedded corpus, smoke run (shipped defaults)", smoke)
        results = {t: bench_size(t, args, sets, base_env, work) for t in args.tokens}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    begin, end = benchlib.section_marks(SECTION)
    lines = [begin, f"{benchlib.measured(PROG, argv)};"
             f" runs: `scripts/run.py --only baseline --max-steps {args.steps}"
             f" {' '.join('--set ' + s for s in sets)}`.", "",
             *table(results, corpus, smoke, args.steps), end]
    print("\n".join(lines[1:-1]))
    benchlib.write_section(pathlib.Path(args.out), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
