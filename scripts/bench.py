"""Benchmark the JAX training step against the PyTorch reference, in one process, on the same batches.

Contenders (--contenders):
  jax            train_step, one dispatch per step, metrics read once per block
  jax_fused      train_steps: a block of K steps in one dispatch (lax.scan)
  torch          torch_compat.reference + torch.optim.AdamW, eager (its train_step reads the loss every step)
  torch_compile  the same with model and loss under torch.compile ("failed: ..." if it does not build)

Configs (--configs) are experiment names (config.EXPERIMENTS) with optional
overrides and batch kind: `baseline`, `baseline@dense`, `baseline:dtype=bfloat16`.
`@corpus` batches (the default) come from the default corpus through the grain
pipeline, as in the README run (about a third of the labels are PAD); `@dense`
batches are random ids without PAD, so every position does full work. Every
contender starts from the same parameters and sees the same batches; contenders
run in interleaved rounds, so a machine shared with other work slows all alike.

`--section data` times the data path instead (reading a users'-shaped
tokenized_data.pt, segmentation, split, batches/s of the grain pipeline).

Examples:
  python scripts/bench.py                                   # the full table -> BENCHMARKS.md
  python scripts/bench.py --section data                    # the data path -> "Measured: data"
  python scripts/bench.py --configs baseline --contenders jax,torch --rounds 3 --out /tmp/b.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import warnings

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from minigpt_jax import config as cfg  # noqa: E402

CONTENDERS = ("jax", "jax_fused", "torch", "torch_compile")
DEFAULT_CONFIGS = ("baseline@dense,baseline,baseline:dtype=bfloat16,lr_1e-3,batch_size_16,"
                   "n_layers_1,embed_dim_64")
N_BATCHES = 8  # distinct batches cycled through by every contender
# Datasheet dense peaks in TFLOP/s: (bf16, tf32). JAX runs float32 matmuls as TF32 on these GPUs.
GPU_PEAKS = {"H100 SXM": (989.0, 495.0), "H100 PCIe": (756.0, 378.0), "H200": (989.0, 495.0),
             "A100": (312.0, 156.0)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated NAME[:key=value...][@corpus|@dense] (default: %(default)s)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of: %(default)s")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds; every contender times one block per round (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per JAX block, also jax_fused's K (default: 4 on CPU, 50 on GPU)")
    p.add_argument("--torch-steps", type=int, default=None,
                   help="steps per PyTorch block (default: 1 on CPU, 20 on GPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field in every config, e.g. --set seq_len=128; repeatable")
    p.add_argument("--out", default="BENCHMARKS.md",
                   help="markdown file whose generated section (between bench markers) is rewritten"
                        " (default: %(default)s)")
    p.add_argument("--section", default="main",
                   help="name of the generated section to rewrite, so several runs share one file (default: %(default)s)")
    p.add_argument("--data-file", default="/tmp/minigpt_bench_tokenized_data.pt",
                   help="--section data: the tokenized_data.pt to time, written when missing"
                        " (default: %(default)s)")
    p.add_argument("--data-tokens", type=int, default=100_000_000,
                   help="--section data: tokens in a newly written --data-file (default: %(default)s)")
    p.add_argument("--data-seq-len", type=int, default=64, help="--section data (default: %(default)s)")
    p.add_argument("--data-batch-size", type=int, default=32, help="--section data (default: %(default)s)")
    p.add_argument("--data-seconds", type=float, default=5.0,
                   help="--section data: seconds per pipeline rate (default: %(default)s)")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="keep glibc's default allocator (otherwise host.tune_host_allocator, for all contenders)")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"bench.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_configs(text: str, overrides: dict) -> list[tuple[str, str, cfg.Config]]:
    """'baseline:dtype=bfloat16@dense' -> [(label, batch kind, Config)]; ConfigError on bad input."""
    out = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        body, _, kind = spec.partition("@")
        if kind not in ("", "corpus", "dense"):
            raise cfg.ConfigError(f"--configs {spec!r}: the batch kind must be @corpus or @dense")
        name, *items = body.split(":")
        out.append((spec, kind or "corpus", cfg.experiment_config(name, {**overrides, **cfg.parse_overrides(items)})))
    if not out:
        raise cfg.ConfigError("--configs is empty; experiments: " + ", ".join(cfg.EXPERIMENTS))
    return out


def train_flops(c: cfg.Config) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), every position counted.

    Per token, forward: 2 x (matmul weights: n_layers x (4 D^2 + 2 D F) + D V), plus attention
    n_layers x 4 L D (q.k scores and probs.v over all L keys, causal mask not discounted).
    Embedding lookups, LayerNorm, softmax, GELU and AdamW are not counted.
    """
    D, F, V, L = c.embed_dim, c.ffn_dim, c.vocab_size, c.seq_len
    weights = c.n_layers * (4 * D * D + 2 * D * F) + D * V
    return 3.0 * c.batch_size * L * (2 * weights + c.n_layers * 4 * L * D)


# --- machine -----------------------------------------------------------------------------

def describe_machine(tuned: bool) -> dict:
    import jax
    dev = jax.devices()[0]
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    mem = ""
    with contextlib.suppress(OSError, StopIteration):
        kb = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    versions = f"jax {jax.__version__}"
    with contextlib.suppress(ImportError):
        import torch
        versions += f", torch {torch.__version__}"
    return {"gpu": dev.platform == "gpu", "platform": dev.platform, "kind": dev.device_kind,
            "host": f"{cpu}, {os.cpu_count()} cores{mem}", "versions": versions, "tuned": tuned,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def gpu_peak(kind: str, dtype: str) -> float | None:
    """Datasheet peak FLOP/s for a known GPU kind, else None."""
    k = kind.upper()
    name = ("H100 PCIe" if "PCIE" in k else "H100 SXM") if "H100" in k else (
        "H200" if "H200" in k else ("A100" if "A100" in k else None))
    if name is None:
        return None
    bf16, tf32 = GPU_PEAKS[name]
    return (bf16 if dtype == "bfloat16" else tf32) * 1e12


class Ceiling:
    """A large float32 matmul, JAX and PyTorch, timed once per round: the machine's attainable FLOP/s."""

    def __init__(self, gpu: bool, with_torch: bool):
        import jax
        import jax.numpy as jnp
        self.n = 8192 if gpu else 4096
        key = jax.random.key(0)
        a, b = jax.random.normal(key, (2, self.n, self.n), jnp.float32)
        mm = jax.jit(jnp.matmul)
        self.fns = {"jax": lambda: jax.block_until_ready(mm(a, b))}
        if with_torch:
            import torch
            dev = "cuda" if gpu else "cpu"
            ta, tb = torch.randn(self.n, self.n, device=dev), torch.randn(self.n, self.n, device=dev)
            sync = torch.cuda.synchronize if gpu else (lambda: None)
            self.fns["torch"] = lambda: (torch.mm(ta, tb), sync())
        self.samples = {k: [] for k in self.fns}
        for f in self.fns.values():
            f()  # compile, warm up

    def measure(self):
        for k, f in self.fns.items():
            t = time.perf_counter()
            f()
            self.samples[k].append(2 * self.n**3 / (time.perf_counter() - t))

    def flops(self) -> dict:
        return {k: statistics.median(v) for k, v in self.samples.items() if v}


# --- batches -----------------------------------------------------------------------------

def make_batches(c: cfg.Config, kind: str):
    """N_BATCHES (B, L) int32 batches and the input pipeline's batches/s (corpus only)."""
    import numpy as np
    if kind == "dense":
        rng = np.random.default_rng(c.seed)
        return [rng.integers(0, cfg.PAD_TOKEN_ID, (c.batch_size, c.seq_len)).astype(np.int32)
                for _ in range(N_BATCHES)], None
    from minigpt_jax import data, sources
    train_chunks = data.prepare(sources.default_corpus(), c).train
    per_epoch = data.steps_per_epoch(len(train_chunks), c.batch_size)
    n = 400
    ds = data.batch_dataset(train_chunks, c.batch_size, c.seed, -(-n // per_epoch))
    t = time.perf_counter()
    it = data.batch_iterator(ds, 0, c.num_workers)  # as the training loop reads it
    batches = [next(it) for _ in range(n)]
    rate = n / (time.perf_counter() - t)
    return batches[:N_BATCHES], rate


# --- contenders --------------------------------------------------------------------------

class JaxContender:
    """train_step per step (metrics read once per block), or train_steps with K steps per dispatch."""

    def __init__(self, name: str, c: cfg.Config, batches, block: int):
        import jax
        import numpy as np

        from minigpt_jax import train
        self.jax, self.train, self.name, self.block = jax, train, name, block
        self.state = train.create_state(c)
        self.init_params = jax.device_get(self.state.params)  # host copy: the state is donated
        self.rng = jax.random.key(c.seed + 1)
        self.fused = name == "jax_fused"
        # every batch on the device before timing: the step alone is timed
        if self.fused:
            self.inputs = [jax.device_put(np.stack([batches[(i * block + k) % len(batches)] for k in range(block)]))
                           for i in range(len(batches))]
        else:
            self.inputs = [jax.device_put(b) for b in batches]
        self.i = 0
        # compiled once, ahead of time: the executable both runs the steps and reports its buffers
        self.fn = (train.train_steps if self.fused else train.train_step).lower(
            self.state, self.inputs[0], self.rng).compile()
        mem = self.fn.memory_analysis()
        self.peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                           - mem.alias_size_in_bytes + mem.temp_size_in_bytes) if mem else None

    def run_block(self) -> tuple[float, float]:
        """Run one block -> (seconds per step, loss of the block's first step)."""
        t = time.perf_counter()
        if self.fused:
            self.state, metrics = self.fn(self.state, self.inputs[self.i % len(self.inputs)], self.rng)
            self.i += 1
            losses = self.jax.device_get(metrics["loss"])  # the block's one host read
        else:
            pending = []
            for _ in range(self.block):
                self.state, m = self.fn(self.state, self.inputs[self.i % len(self.inputs)], self.rng)
                self.i += 1
                pending.append(m["loss"])
            losses = self.jax.device_get(pending)
        return (time.perf_counter() - t) / self.block, float(losses[0])


class TorchContender:
    """torch_compat.reference's MiniGPT and AdamW from the JAX initial parameters, eager or compiled."""

    def __init__(self, name: str, c: cfg.Config, batches, block: int, gpu: bool, jax_params):
        import torch

        from torch_compat import reference as ref
        from torch_compat import to_state_dict
        self.torch, self.ref, self.name, self.block = torch, ref, name, block
        self.device = torch.device("cuda" if gpu else "cpu")
        self.model = ref.MiniGPT.from_config(c)
        self.model.load_state_dict(to_state_dict(jax_params), strict=True)
        self.model.to(self.device)
        self.optimizer = ref.make_optimizer(self.model, c)
        self.inputs = [torch.from_numpy(b).long().to(self.device) for b in batches]
        self.i = 0
        self.bf16 = c.dtype == "bfloat16"
        loss_fn = lambda t: ref.masked_lm_loss(ref.causal_logits(self.model, t), t)  # noqa: E731
        self.loss_fn = torch.compile(loss_fn) if name == "torch_compile" else loss_fn
        self.peak_bytes = None

    def step(self, tokens) -> float:
        if self.name == "torch" and not self.bf16:
            return self.ref.train_step(self.model, self.optimizer, tokens)["loss"]  # the reference's own step
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        autocast = (self.torch.autocast(self.device.type, dtype=self.torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        with autocast:
            loss, _ = self.loss_fn(tokens)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def run_block(self) -> tuple[float, float]:
        t = time.perf_counter()
        losses = []
        for _ in range(self.block):
            losses.append(self.step(self.inputs[self.i % len(self.inputs)]))
            self.i += 1
        return (time.perf_counter() - t) / self.block, losses[0]

    def measure_memory(self):
        """Peak bytes allocated during one step: CUDA's counter, or the CPU profiler's memory timeline."""
        torch = self.torch
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.run_block()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            return
        from torch.profiler import ProfilerActivity, profile
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                         with_stack=True) as prof:
                self.step(self.inputs[self.i % len(self.inputs)])
            path = os.path.join(tmp, "memory.json")
            prof.export_memory_timeline(path, device="cpu")
            _, sizes = json.load(open(path))
            self.peak_bytes = max(sum(s) for s in sizes)


# --- one config --------------------------------------------------------------------------

def bench_config(label: str, kind: str, c: cfg.Config, names: list[str], rounds: int, block: int,
                 torch_block: int, ceiling: Ceiling, gpu: bool, device_kind: str) -> list[dict]:
    from tqdm.auto import tqdm
    batches, pipeline_rate = make_batches(c, kind)
    contenders, failed, warmup = {}, {}, {}
    jax_params = None
    for name in names:
        t = time.perf_counter()
        try:
            if name.startswith("jax"):
                contenders[name] = JaxContender(name, c, batches, block)
                jax_params = jax_params or contenders[name].init_params
            else:
                if jax_params is None:
                    import jax

                    from minigpt_jax.model import init_params
                    jax_params = init_params(c, jax.random.key(c.seed))
                contenders[name] = TorchContender(name, c, batches, torch_block, gpu, jax_params)
            contenders[name].first_loss = contenders[name].run_block()[1]  # compiles; the first step's loss
            contenders[name].run_block()  # warm up
            if name.startswith("torch"):
                contenders[name].measure_memory()
        except Exception as e:  # torch.compile without a working toolchain, a missing torch, ...
            contenders.pop(name, None)
            failed[name] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
            print(f"{label} {name}: {failed[name]}", file=sys.stderr)
        warmup[name] = time.perf_counter() - t

    times = {n: [] for n in contenders}
    bars = {n: tqdm(total=rounds, desc=f"{label} {n}", unit="block", position=i, dynamic_ncols=True)
            for i, n in enumerate(contenders)}
    for _ in range(rounds):
        ceiling.measure()
        for n, con in contenders.items():
            times[n].append(con.run_block()[0])
            bars[n].set_postfix(step_ms=f"{1e3 * statistics.median(times[n]):.1f}")
            bars[n].update()
    for bar in bars.values():
        bar.close()

    flops, tokens = train_flops(c), c.batch_size * c.seq_len
    peak = gpu_peak(device_kind, c.dtype) if gpu else None
    rows = []
    for n in names:
        row = {"config": label, "contender": n, "warmup_s": warmup[n]}
        if n in failed:
            rows.append({**row, "failed": failed[n]})
            continue
        con, step = contenders[n], statistics.median(times[n])
        rows.append({**row, "step_s": step, "tokens_s": tokens / step, "flops_s": flops / step,
                     "mfu": (flops / step / peak) if peak else None, "peak_bytes": con.peak_bytes,
                     "first_loss": con.first_loss, "steps": len(times[n]) * con.block,
                     "pipeline_x": (pipeline_rate * step) if pipeline_rate and n.startswith("jax") else None,
                     "pipeline_rate": pipeline_rate, "flops": flops})
    eager = next((r["step_s"] for r in rows if r["contender"] == "torch" and "step_s" in r), None)
    for r in rows:
        r["vs_eager"] = eager / r["step_s"] if eager and "step_s" in r else None
    return rows


# --- the data pipeline (--section data) -------------------------------------------------

def make_tokenized_file(path: pathlib.Path, tokens: int, seed: int = 0) -> None:
    """A tokenized_data.pt shaped like the users': chunks of at most 512 random ids, 90% exactly
    512, the rest 10..511 tokens, each its own int64 tensor (as their tokenizer loop saved them)."""
    import numpy as np
    import torch
    rng = np.random.default_rng(seed)
    n = tokens // 400 + 16
    lengths = np.where(rng.random(n) < 0.9, 512, rng.integers(10, 512, n))
    ends = np.cumsum(lengths)
    lengths = lengths[:np.searchsorted(ends, tokens) + 1]
    lengths[-1] -= int(lengths.sum()) - tokens  # exactly `tokens` in all
    if lengths[-1] < 10:
        lengths = lengths[:-1]
    ids = torch.from_numpy(rng.integers(0, cfg.PAD_TOKEN_ID, int(lengths.sum()), dtype=np.int64))
    chunks = [t.clone() for t in ids.split(lengths.tolist())]  # separate storages, as theirs
    del ids
    tmp = path.with_suffix(".tmp")
    torch.save(chunks, tmp)
    os.replace(tmp, path)


def _proc_status(key: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _pipeline_rate(datasets, seconds: float, num_threads: int | None = None) -> float:
    """Batches/s of all `datasets` read at once, one thread each (one: the calling thread)."""
    import threading

    import grain

    from minigpt_jax import data
    counts = [0] * len(datasets)
    stop = time.perf_counter() + seconds

    def read(i):
        if num_threads is None:
            it = data.batch_iterator(datasets[i], 0, 0)
        else:  # the previous setting, read-ahead threads, for comparison
            it = iter(datasets[i].to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                                    prefetch_buffer_size=8)))
        n = 0
        while n % 256 or time.perf_counter() < stop:
            next(it)
            n += 1
        counts[i] = n

    t = time.perf_counter()
    if len(datasets) == 1:
        read(0)
    else:
        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(datasets))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    return sum(counts) / (time.perf_counter() - t)


def measure_data(path: str, seq_len: int, batch_size: int, seconds: float) -> dict:
    """In a fresh process: load, check + flatten, prepare, then pipeline batches/s."""
    from minigpt_jax import data
    from torch_compat.data import sequences_from_pt
    from torch_compat.pt_io import load_pt, require_torch
    require_torch("the data benchmark")  # imported before the baseline RSS: not the file's load
    out = {"rss_start": _proc_status("VmRSS")}
    t = time.perf_counter()
    obj = load_pt(path, data.DataError)
    out["load_s"] = time.perf_counter() - t
    out["rss_loaded"], out["hwm_load"] = _proc_status("VmRSS"), _proc_status("VmHWM")
    try:  # reset the peak, so it measures what comes after the load
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out["hwm_reset"] = True
    except OSError:
        out["hwm_reset"] = False
    t = time.perf_counter()
    seqs = sequences_from_pt(obj, path)
    out["read_s"] = time.perf_counter() - t
    del obj  # as read_sequences drops it on return
    t = time.perf_counter()
    c = cfg.Config(seq_len=seq_len, batch_size=batch_size)
    prepared = data.prepare(seqs, c)
    out["prepare_s"] = time.perf_counter() - t
    out["hwm"], out["rss_end"] = _proc_status("VmHWM"), _proc_status("VmRSS")
    out.update(sequences=len(seqs), tokens=len(seqs.tokens), summary=prepared.summary(),
               train=len(prepared.train), val=len(prepared.val))
    make = lambda seed: data.batch_dataset(prepared.train, batch_size, seed, 1000)  # noqa: E731
    _pipeline_rate([make(c.seed)], 0.5)  # warm-up: the epoch's permutation, caches
    out["rate_1"] = _pipeline_rate([make(c.seed)], seconds)
    out["rate_5"] = _pipeline_rate([make(c.seed) for _ in range(5)], seconds)
    out["rate_1_threads2"] = _pipeline_rate([make(c.seed)], seconds, num_threads=2)
    return out


def data_main(args) -> int:
    """--section data: time and size the data path on a users'-shaped file -> BENCHMARKS.md."""
    import subprocess
    path = pathlib.Path(args.data_file)
    t = time.perf_counter()
    if not path.exists():
        print(f"bench.py: writing {path} ({args.data_tokens:,} tokens)", file=sys.stderr)
        make_tokenized_file(path, args.data_tokens)
    made_s = time.perf_counter() - t
    call = (f"measure_data({str(path)!r}, {args.data_seq_len}, {args.data_batch_size},"
            f" {args.data_seconds})")
    code = (f"import json, sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'scripts')!r}];"
            f" import bench; print(json.dumps(bench.{call}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        fail(f"measuring {path} failed: {proc.stderr.strip().splitlines()[-1:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    int32 = 4 * m["tokens"]
    extra = m["hwm"] - m["rss_loaded"]
    work = m["read_s"] + m["prepare_s"]
    shape = f"batch_size {args.data_batch_size} x seq_len {args.data_seq_len}"
    peak = ("reset (clear_refs) after torch.load returns" if m["hwm_reset"]
            else "since the process started (reset unavailable)")
    command = ("python scripts/bench.py " + " ".join(sys.argv[1:])).strip()
    machine = describe_machine(False)
    lines = [
        "<!-- bench:begin data -->",
        "### Measured: data",
        "",
        f"- Machine: {machine['host']}; {machine['versions']}.",
        f"- Command: `{command}`",
        f"- File: `{path}`, {mib(path.stat().st_size)}, {m['sequences']:,} int64 tensors"
        f" ({m['tokens']:,} tokens: 90% exactly 512, the rest 10..511, random ids)"
        + (f"; written in {made_s:.0f} s." if made_s > 1 else " (reused)."),
        f"- Prepared (seq_len {args.data_seq_len}, val_fraction 0.05): {m['summary']}.",
        f"- Each stage runs once, in a fresh process; peak memory is VmHWM {peak}.",
        f"- Pipelines: {shape}, {args.data_seconds:g} s each, after a warm-up.",
        "",
        "| stage | measured | target |",
        "|---|---:|---|",
        f"| torch.load (weights_only) | {m['load_s']:.1f} s; RSS"
        f" +{mib(m['rss_loaded'] - m['rss_start'])} (peak +{mib(m['hwm_load'] - m['rss_start'])})"
        " | the file's own load |",
        f"| check + flatten to int32 (`sequences_from_pt`) | {m['read_s']:.1f} s | |",
        f"| split + segment + statistics (`data.prepare`) | {m['prepare_s']:.1f} s | |",
        f"| check + segment + split, load excluded | **{work:.1f} s** | <= 60 s |",
        f"| the same, load included | **{work + m['load_s']:.1f} s** | |",
        f"| peak RSS above the loaded file | **{mib(extra)}** = {extra / int32:.2f}x the tokens'"
        f" int32 size ({mib(int32)}) | <= 3x |",
        f"| one pipeline (`batch_dataset` + `batch_iterator`) | **{m['rate_1']:,.0f} batches/s**"
        " | >= 20,000/s |",
        f"| five pipelines, one thread each | **{m['rate_5']:,.0f} batches/s** in all ="
        f" {m['rate_5'] / m['rate_1']:.2f}x one | >= 4x one |",
        "| one pipeline through 2 grain read-ahead threads (the previous setting) |"
        f" {m['rate_1_threads2']:,.0f} batches/s | |",
        "",
        "<!-- bench:end data -->",
    ]
    marks = ("<!-- bench:begin data -->", "<!-- bench:end data -->")
    write_section(pathlib.Path(args.out), *marks, lines)
    print("\n".join(lines))
    print(f"bench.py: wrote {args.out}")
    return 0


# --- report ------------------------------------------------------------------------------

def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def write_markdown(path: pathlib.Path, section: str, machine: dict, rows: list[dict], ceiling: dict,
                   command: str, block: int, torch_block: int, rounds: int) -> None:
    """Rewrite the section between this section's markers, keeping the rest of the file."""
    BEGIN, END = f"<!-- bench:begin {section} -->", f"<!-- bench:end {section} -->"
    best = max(ceiling.values())
    unit, scale = ("TFLOP/s", 1e12) if machine["gpu"] else ("GFLOP/s", 1e9)
    lines = [
        BEGIN,
        f"### Measured: {section}",
        "",
        f"- Machine: {machine['host']}; JAX device `{machine['platform']}` ({machine['kind']}); {machine['versions']}.",
        f"- Host allocator: {'tuned (`host.tune_host_allocator()`, every contender)' if machine['tuned'] else 'glibc default'};"
        f" XLA_FLAGS: `{machine['xla_flags'] or '(none)'}`.",
        f"- Command: `{command}`",
        f"- Ceiling: float32 {4096 if not machine['gpu'] else 8192}^3 matmul, timed every round: "
        + ", ".join(f"{k} {v / scale:.1f} {unit}" for k, v in ceiling.items()) + f"; the best, {best / scale:.1f}"
        f" {unit}, is the ceiling.",
        f"- Median step time over {rounds} interleaved rounds of {block} JAX steps (jax_fused: one dispatch of"
        f" K={block}) and {torch_block} PyTorch step(s); warm-up and compilation excluded.",
        "- FLOPs per step: `3 * B * L * (2 * (n_layers * (4 D^2 + 2 D F) + D V) + n_layers * 4 L D)` "
        "(forward + backward = 3x forward; every position counted, the causal half of attention too).",
        "- On `@corpus` batches the JAX step skips the LM head for PAD labels, so its FLOP/s (the formula"
        " over every position) is an effective rate that can pass the ceiling; `@dense` rows measure how"
        " close the step runs to the hardware.",
        "- tokens/s = B x L / step time. Peak memory: JAX, XLA's buffers for the step (arguments + outputs -"
        " donated + temporaries); PyTorch, the allocator's peak over one step (CPU: profiler memory timeline).",
        "- Input pipeline: the grain iterator's batches/s over 400 batches (thread start included), as a"
        " multiple of the JAX step rate.",
        "",
        f"| config | contender | step ms | tokens/s | x torch eager | {unit} | % of ceiling | MFU"
        " | peak MB | first loss | pipeline x step | warm-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['config']} | {r['contender']} | {r['failed']} | | | | | | | | | {r['warmup_s']:.0f} |")
            continue
        lines.append(
            f"| {r['config']} | {r['contender']} | {1e3 * r['step_s']:.1f} | {r['tokens_s']:,.0f} "
            f"| {fmt(r['vs_eager'], '.2f')} | {r['flops_s'] / scale:.1f} | {100 * r['flops_s'] / best:.0f}% "
            f"| {fmt(r['mfu'] and 100 * r['mfu'], '.1f')} | {fmt(r['peak_bytes'] and r['peak_bytes'] / 2**20, '.0f')} "
            f"| {r['first_loss']:.4f} | {fmt(r['pipeline_x'], ',.0f')} | {r['warmup_s']:.0f} |")
    lines += ["", END]
    write_section(path, BEGIN, END, lines)


def write_section(path: pathlib.Path, begin: str, end: str, lines: list[str]) -> None:
    """Put lines (which start with begin and end with end) in place of the old section, or append."""
    text = "\n".join(lines)
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        text = old[:old.index(begin)] + text + old[old.index(end) + len(end):]
    elif old:
        text = old.rstrip() + "\n\n" + text + "\n"
    else:
        text = "# Benchmarks\n\n" + text + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.section == "data":  # the data path, not the step: see data_main
        return data_main(args)
    try:
        configs = parse_configs(args.configs, cfg.parse_overrides(args.overrides))
        names = [c.strip() for c in args.contenders.split(",") if c.strip()]
        if not names or set(names) - set(CONTENDERS):
            raise cfg.ConfigError(f"--contenders {args.contenders!r}: choose from {', '.join(CONTENDERS)}")
        if not args.section.replace("-", "").replace("_", "").isalnum():
            raise cfg.ConfigError(f"--section {args.section!r}: use letters, digits, - and _")
        for flag, value in (("--rounds", args.rounds), ("--steps", args.steps), ("--torch-steps", args.torch_steps)):
            if value is not None and value <= 0:
                raise cfg.ConfigError(f"{flag} {value}: must be a positive integer")
    except cfg.ConfigError as e:
        fail(str(e))

    # Before JAX or PyTorch allocate anything; process-wide, so PyTorch runs with it too.
    import jax

    from minigpt_jax import host
    tuned = not args.no_tune_allocator and host.tune_host_allocator(jax.default_backend())
    names = [n for n in CONTENDERS if n in names]  # JAX first: PyTorch starts from its parameters

    machine = describe_machine(tuned)
    block = args.steps or (50 if machine["gpu"] else 4)
    torch_block = args.torch_steps or (20 if machine["gpu"] else 1)
    with_torch = any(n.startswith("torch") for n in names)
    if with_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            fail("PyTorch is not installed; install the [torch] extra or pass --contenders jax,jax_fused")
    if with_torch and machine["gpu"]:
        import torch
        torch.set_float32_matmul_precision("high")  # TF32, as JAX's default float32 matmuls on GPU
    ceiling = Ceiling(machine["gpu"], with_torch)
    rows = []
    for label, kind, c in configs:
        rows += bench_config(label, kind, c, names, args.rounds, block, torch_block, ceiling,
                             machine["gpu"], machine["kind"])
    command = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_markdown(pathlib.Path(args.out), args.section, machine, rows, ceiling.flops(), command.strip(),
                   block, torch_block, args.rounds)
    print(f"bench.py: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
