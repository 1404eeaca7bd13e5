"""The training step's contenders, timed on the same batches from the same parameters:
ours (`train_step`, `train_steps`), the PyTorch reference (eager, torch.compile), a matmul
ceiling, and our step compiled with a chosen LM-head path and chunk. Used by bench.py,
bench_head.py and gpu_check.py; nothing runs at import.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import warnings

from benchmarks import benchlib
from minigpt_jax import config as cfg

CONTENDERS = ("jax", "jax_fused", "torch", "torch_compile")


class Ceiling:
    """A large float32 matmul, JAX and PyTorch, timed once per round: the machine's attainable
    FLOP/s (TF32 on GPUs, as the step's float32 matmuls)."""

    def __init__(self, gpu: bool, with_torch: bool, n: int | None = None):
        import jax
        import jax.numpy as jnp
        self.n = n or (8192 if gpu else 4096)  # n: a smaller matmul for quick checks
        a, b = jax.random.normal(jax.random.key(0), (2, self.n, self.n), jnp.float32)
        mm = jax.jit(jnp.matmul)
        self.fns = {"jax": lambda: jax.block_until_ready(mm(a, b))}
        if with_torch:
            import torch
            dev = "cuda" if gpu else "cpu"
            ta, tb = (torch.randn(self.n, self.n, device=dev) for _ in range(2))
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
        return {k: benchlib.median(v) for k, v in self.samples.items() if v}


class JaxContender:
    """train_step per step (metrics read once per block), or train_steps with K steps per
    dispatch."""

    def __init__(self, name: str, c: cfg.Config, batches, block: int):
        import jax
        import numpy as np

        from minigpt_jax import train
        self.jax, self.name, self.block = jax, name, block
        self.state = train.create_state(c)
        self.init_params = jax.device_get(self.state.params)  # host copy: the state is donated
        self.rng = jax.random.key(c.seed + 1)
        self.fused = name == "jax_fused"
        # every batch on the device before timing: the step alone is timed
        if self.fused:
            self.inputs = [jax.device_put(np.stack([batches[(i * block + k) % len(batches)]
                                                    for k in range(block)]))
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
            self.state, metrics = self.fn(self.state, self.inputs[self.i % len(self.inputs)],
                                          self.rng)
            self.i += 1
            losses = self.jax.device_get(metrics["loss"])  # the block's one host read
        else:
            pending = []
            for _ in range(self.block):
                self.state, m = self.fn(self.state, self.inputs[self.i % len(self.inputs)],
                                        self.rng)
                self.i += 1
                pending.append(m["loss"])
            losses = self.jax.device_get(pending)
        return (time.perf_counter() - t) / self.block, float(losses[0])

    def measure_memory(self):
        pass  # XLA's buffer assignment, read at compile time


class TorchContender:
    """torch_compat.reference's MiniGPT and AdamW from the JAX initial parameters, eager or
    compiled."""

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
            return self.ref.train_step(self.model, self.optimizer, tokens)["loss"]  # theirs
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
        """Peak bytes allocated during one step: CUDA's counter, or the CPU profiler's memory
        timeline."""
        torch = self.torch
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.run_block()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            return
        from torch.profiler import ProfilerActivity, profile
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                         record_shapes=True, with_stack=True) as prof:
                self.step(self.inputs[self.i % len(self.inputs)])
            path = os.path.join(tmp, "memory.json")
            prof.export_memory_timeline(path, device="cpu")
            _, sizes = json.load(open(path))
            self.peak_bytes = max(sum(s) for s in sizes)


def _build(name: str, c: cfg.Config, batches, block: int, torch_block: int, gpu: bool,
           jax_params):
    """One contender, compiled and warmed up, its first step's loss and memory measured."""
    if name.startswith("jax"):
        con = JaxContender(name, c, batches, block)
    else:
        if jax_params is None:
            import jax

            from minigpt_jax.model import init_params
            jax_params = init_params(c, jax.random.key(c.seed))
        con = TorchContender(name, c, batches, torch_block, gpu, jax_params)
    con.first_loss = con.run_block()[1]  # compiles; the first step's loss
    con.run_block()  # warm up
    con.measure_memory()
    return con


def measure_config(label: str, kind: str, c: cfg.Config, names: list[str], rounds: int,
                   block: int, torch_block: int, ceiling: Ceiling, machine: dict,
                   progress=None) -> list[dict]:
    """Every contender of `names` on one config's batches, in interleaved rounds -> one row
    each: step_s, tokens_s, flops_s, mfu (GPU datasheet peak), peak_bytes, first_loss,
    vs_eager, or "failed" with the reason (torch.compile without a toolchain, ...)."""
    batches, pipeline_rate = benchlib.make_batches(c, kind)
    contenders, failed, warmup = {}, {}, {}
    jax_params = None
    for name in names:
        t = time.perf_counter()
        try:
            contenders[name] = _build(name, c, batches, block, torch_block, machine["gpu"],
                                      jax_params)
            if name.startswith("jax"):
                jax_params = jax_params or contenders[name].init_params
        except Exception as e:  # a contender that cannot run is a row saying why, not a crash
            text = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            failed[name] = f"failed: {type(e).__name__}: {text}"
            print(f"{label} {name}: {failed[name]}", file=sys.stderr)
        warmup[name] = time.perf_counter() - t
    runs = {n: (lambda con=con: con.run_block()[0]) for n, con in contenders.items()}
    times = {n: [] for n in contenders}
    for r in range(rounds):
        ceiling.measure()
        for n, got in benchlib.interleaved(runs, 1).items():
            times[n] += got
        if progress:
            progress(f"{label}: round {r + 1}/{rounds} " + ", ".join(
                f"{n} {1e3 * benchlib.median(t):.2f} ms" for n, t in times.items()))
    return _rows(label, c, names, contenders, failed, warmup, times, machine, pipeline_rate)


def _rows(label, c, names, contenders, failed, warmup, times, machine, pipeline_rate):
    flops, tokens = benchlib.train_flops(c), c.batch_size * c.seq_len
    peak = benchlib.gpu_peak(machine["kind"], c.dtype) if machine["gpu"] else None
    rows = []
    for n in names:
        row = {"config": label, "contender": n, "warmup_s": warmup[n], "dtype": c.dtype}
        if n in failed:
            rows.append({**row, "failed": failed[n]})
            continue
        con, step = contenders[n], benchlib.median(times[n])
        pipe = (pipeline_rate * step) if pipeline_rate and n.startswith("jax") else None
        rows.append({**row, "step_s": step, "tokens_s": tokens / step, "flops_s": flops / step,
                     "mfu": (flops / step / peak) if peak else None,
                     "peak_bytes": con.peak_bytes, "first_loss": con.first_loss,
                     "steps": len(times[n]) * con.block, "pipeline_x": pipe,
                     "pipeline_rate": pipeline_rate, "flops": flops})
    eager = next((r["step_s"] for r in rows if r["contender"] == "torch" and "step_s" in r), None)
    for r in rows:
        r["vs_eager"] = eager / r["step_s"] if eager and "step_s" in r else None
    return rows


def compiled_step(state, batch, rng, path: str | None, chunk: int | None, module=None):
    """module's (default minigpt_jax.train) step compiled with losses.HEAD_PATH=path and that
    path's chunk rows (HEAD_CHUNK and ACCEL_HEAD_CHUNK) set to chunk; None keeps a setting."""
    import jax

    from minigpt_jax import losses, train
    module = module or train
    saved = losses.HEAD_PATH, losses.HEAD_CHUNK, losses.ACCEL_HEAD_CHUNK
    try:
        if path is not None:
            losses.HEAD_PATH = path
        if chunk is not None:
            losses.HEAD_CHUNK = losses.ACCEL_HEAD_CHUNK = chunk
        # a new function object: JAX caches traces by function; the settings are read when tracing
        step = jax.jit(lambda *a: module._step(*a), donate_argnums=0)
        return step.lower(state, batch, rng).compile()
    finally:
        losses.HEAD_PATH, losses.HEAD_CHUNK, losses.ACCEL_HEAD_CHUNK = saved
