"""The scaling law L(N, D) = E + A / N^alpha + B / D^beta: counting, the fit, its intervals, and
the compute-optimal size. Pure functions over arrays and tables: nothing here trains.

- Counting: N is every parameter (`config.num_params`) or the non-embedding ones (without the
  token and positional tables and the untied head, Kaplan et al. 2020). Training FLOPs per
  token are 3x the forward's matmuls: the blocks' weights, the attention over the whole
  seq_len context (the model computes the dense L x L scores under a mask) and the LM head
  (2 D V: most of a step at small widths). Not 6N: 6N misses attention and counts the
  embedding lookup as a matmul (Porian et al. 2024 trace much of Kaplan's and Hoffmann's
  disagreement to such counting).
- The fit is Hoffmann et al. 2022's approach 3: minimise the Huber loss (delta 1e-3) of the
  log residuals, log L_hat - log L with log L_hat = LSE(a - alpha log N, b - beta log D, e), by
  L-BFGS (scipy.optimize) from a grid of starts, keeping the best. Every point of the grid is
  scored first (one array operation) and L-BFGS starts from the best `starts` of them.
- Intervals: 95% percentile bootstrap (scipy.stats.bootstrap) over the runs (a run's points
  resampled together: one run per shape gives several budgets), or over the points when there
  are too few runs; each resample refitted from the full fit's optimum and its best grid start.
- Refusals (FitError, one line): fewer than 5 points, one value of N, one value of D, a
  non-positive or non-finite value. Warnings: the optimum at the edge of the start grid, N or
  D spanning under 3x, an exponent whose interval is wider than itself.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import warnings

import numpy as np
from scipy import optimize, special, stats
from threadpoolctl import threadpool_limits

from minigpt_jax.config import Config, num_params

NAMES = ("E", "A", "alpha", "B", "beta")
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, approach 3
MIN_POINTS = 5  # five constants
MIN_RUNS = 6  # runs to resample as units; fewer leave too many resamples of one size
MIN_SPAN = 3.0  # N or D spanning less than this factor leaves its exponent loosely identified
# Hoffmann et al.'s grid for a, b and the exponents; e's is relative to the table's losses
# (E is below the smallest loss), so the grid suits any loss scale.
GRID_AB = np.arange(0.0, 26.0, 5.0)
GRID_EXP = np.arange(0.0, 2.01, 0.5)
GRID_E_SHARE = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
# L-BFGS-B's bounds on (e, a, alpha, b, beta): wide, only to keep exp() finite and the
# exponents non-negative; an optimum on one is reported as a warning.
MAXITER = 1000  # L-BFGS iterations per start; a well-posed table converges in under 200
BOUNDS = [(-20.0, 20.0), (-20.0, 200.0), (0.0, 10.0), (-20.0, 200.0), (0.0, 10.0)]


class FitError(ValueError):
    """Data that cannot identify the law, or a table that cannot be read; one line."""


# --- counting -------------------------------------------------------------------------------

def non_embedding_params(c: Config) -> int:
    """Parameters outside the token table, positional table and head (report.parameter_split's
    blocks and ln_f)."""
    return num_params(c) - 2 * c.vocab_size * c.embed_dim - c.seq_len * c.embed_dim


def count_params(c: Config, count: str) -> int:
    """N as `count` says: "all" or "nonembed"."""
    if count not in ("all", "nonembed"):
        raise FitError(f"--count {count!r}: expected all or nonembed")
    return num_params(c) if count == "all" else non_embedding_params(c)


def flops_per_token(c: Config) -> int:
    """Training FLOPs per token position: 3 x the forward's multiply-adds x 2 (backward = 2 x
    forward). Per block: qkv 6d^2, projection 2d^2, FFN 4 d f, scores and weighted values
    4 d seq_len (dense scores over the whole context); the head 2 d V."""
    d, f = c.embed_dim, c.ffn_dim
    block = 6 * d * d + 2 * d * d + 4 * d * f + 4 * d * c.seq_len
    return 3 * (c.n_layers * block + 2 * d * c.vocab_size)


# --- the law and its fit ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fit:
    """A fitted law: values of E, A, alpha, B, beta, their 95% bootstrap intervals, the
    bootstrap's constants (one row per resample) and what to be wary of."""

    values: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    replicates: np.ndarray  # (resamples, 5) constants in NAMES order
    warnings: list[str]
    points: int
    objective: float  # the Huber loss at the optimum, over delta

    def to_json(self) -> dict:
        d = {k: {"value": self.values[k], "low": self.low[k], "high": self.high[k]} for k in NAMES}
        return {**d, "points": self.points, "warnings": list(self.warnings),
                "method": "Hoffmann et al. 2022 approach 3: Huber (delta 1e-3) of log residuals,"
                          " L-BFGS from a grid; 95% percentile bootstrap over runs (or points)"}


def loss(constants, N, D) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta for constants (E, A, alpha, B, beta), broadcast
    over arrays (a (k, 5) array of constants gives k rows)."""
    c = np.asarray(constants, float)
    E, A, alpha, B, beta = (c[:, i, None] if c.ndim > 1 else c[i] for i in range(5))
    return E + A / np.asarray(N, float) ** alpha + B / np.asarray(D, float) ** beta


def _lse(terms):
    """log(sum(exp(terms), axis=0)), stable (scipy's logsumexp costs more than the fit here)."""
    m = terms.max(0)
    return m + np.log(np.exp(terms - m).sum(0))


def _objective(theta, logN, logD, logL):
    """Sum of Huber(log L_hat - log L) / delta and its gradient in theta = (e, a, alpha, b,
    beta)."""
    e, a, alpha, b, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    pred = _lse(terms)
    r = pred - logL
    w = np.exp(terms - pred)  # softmax: d pred / d term
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA
    grad = np.array([(dr * w[2]).sum(), (dr * w[0]).sum(), -(dr * w[0] * logN).sum(),
                     (dr * w[1]).sum(), -(dr * w[1] * logD).sum()])
    return special.huber(HUBER_DELTA, r).sum() / HUBER_DELTA, grad


def _grid(logL) -> np.ndarray:
    """The start grid in theta = (e, a, alpha, b, beta): (k, 5)."""
    e = np.log(GRID_E_SHARE * np.exp(logL.min()))
    return np.stack(np.meshgrid(e, GRID_AB, GRID_EXP, GRID_AB, GRID_EXP, indexing="ij"),
                    -1).reshape(-1, 5)


def _screen(grid, logN, logD, logL, k: int) -> np.ndarray:
    """The k grid points of lowest objective, scored all at once."""
    e, a, alpha, b, beta = (grid[:, i, None] for i in range(5))
    e = np.broadcast_to(e, (len(grid), len(logN)))
    terms = np.stack([a - alpha * logN, b - beta * logD, e])
    r = _lse(terms) - logL
    scores = special.huber(HUBER_DELTA, r).sum(1)
    return grid[np.argsort(scores, kind="stable")[:k]]


def _minimise(starts, logN, logD, logL) -> tuple[np.ndarray, float]:
    best = None
    for x0 in starts:
        r = optimize.minimize(_objective, x0, args=(logN, logD, logL), jac=True, method="L-BFGS-B",
                              bounds=BOUNDS,
                              options={"maxiter": MAXITER, "ftol": 1e-13, "gtol": 1e-9})
        if np.all(np.isfinite(r.x)) and (best is None or r.fun < best.fun):
            best = r
    return best.x, float(best.fun)


def _constants(theta) -> np.ndarray:
    e, a, alpha, b, beta = theta
    return np.array([np.exp(e), np.exp(a), alpha, np.exp(b), beta])


def check(N, D, L) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table as float arrays, or FitError when it cannot identify the law."""
    N, D, L = (np.asarray(x, float).ravel() for x in (N, D, L))
    if not len(N) == len(D) == len(L):
        raise FitError(f"N, D and loss have {len(N)}, {len(D)} and {len(L)} values; expected one"
                       " each per run")
    for name, x in (("N", N), ("D", D), ("loss", L)):
        if not np.all(np.isfinite(x) & (x > 0)):
            raise FitError(f"{name} holds a non-positive or non-finite value; expected positive"
                           " numbers")
    if len(L) < MIN_POINTS:
        raise FitError(f"{len(L)} points; expected at least {MIN_POINTS} to fit five constants")
    for name, x, what in (("N", N, "model size (shape)"), ("D", D, "token budget")):
        if len(np.unique(x)) < 2:
            raise FitError(f"one value of {name} ({x[0]:.4g}); expected at least two: one"
                           f" {what} cannot identify the law")
    return N, D, L


def fit(N, D, L, *, groups=None, resamples: int = 200, starts: int = 16, seed: int = 0) -> Fit:
    """Approach 3 on the points (N, D, L) with a percentile bootstrap; FitError when they
    cannot identify the law (check). groups: each point's run; with at least MIN_RUNS runs
    the bootstrap resamples runs (a run's points together), else points (with a warning)."""
    N, D, L = check(N, D, L)
    groups = np.arange(len(L)) if groups is None else np.asarray(groups)
    # L-BFGS-B's tiny BLAS calls slow down 50x when BLAS threads contend for busy cores
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit(N, D, L, groups, resamples, starts, seed)


def _fit(N, D, L, groups, resamples: int, starts: int, seed: int) -> Fit:
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    grid = _grid(logL)
    theta, objective = _minimise(_screen(grid, logN, logD, logL, starts), logN, logD, logL)
    values = _constants(theta)
    runs = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    notes = []
    if len(runs) < MIN_RUNS:
        notes.append(f"{len(runs)} runs, too few to resample: the bootstrap resamples points,"
                     " treating a run's budgets as independent (intervals too narrow)")
        runs = [np.array([i]) for i in range(len(L))]

    def refit(picked):
        idx = np.concatenate([runs[int(i)] for i in picked])
        args = logN[idx], logD[idx], logL[idx]
        if len(np.unique(args[0])) < 2 or len(np.unique(args[1])) < 2:
            return np.full(5, np.nan)  # this resample cannot identify the law: left out
        x0 = np.vstack([theta, _screen(grid, *args, 1)])
        return _constants(_minimise(x0, *args)[0])

    with warnings.catch_warnings():  # scipy's own interval of left-out (NaN) resamples: unused
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        boot = stats.bootstrap((np.arange(len(runs)),), refit, n_resamples=resamples,
                               method="percentile", vectorized=False, confidence_level=0.95,
                               random_state=np.random.default_rng(seed))
    reps = np.asarray(boot.bootstrap_distribution).T
    reps = reps[np.isfinite(reps).all(1)]
    low, high = np.percentile(reps, 2.5, axis=0), np.percentile(reps, 97.5, axis=0)
    return Fit(dict(zip(NAMES, map(float, values))), dict(zip(NAMES, map(float, low))),
               dict(zip(NAMES, map(float, high))), reps,
               notes + cautions(theta, grid, N, D, low, high, values), len(L), objective)


def cautions(theta, grid, N, D, low, high, values) -> list[str]:
    """What makes the fit hard to trust: the optimum on or past the start grid's edge, too
    narrow a span of N or D, an exponent whose interval is wider than itself."""
    out = []
    lo, hi = grid.min(0), grid.max(0)
    names = ("log E", "log A", "alpha", "log B", "beta")
    for i, name in enumerate(names):
        if theta[i] <= lo[i] + 1e-6 or theta[i] >= hi[i] - 1e-6:
            out.append(f"{name} = {theta[i]:.3g} is at or past the start grid's edge"
                       f" [{lo[i]:.3g}, {hi[i]:.3g}]: the optimum may lie outside what the data"
                       " can place")
    for name, x, exp in (("N", N, "alpha"), ("D", D, "beta")):
        span = x.max() / x.min()
        if span < MIN_SPAN:
            out.append(f"{name} spans only {span:.2f}x (expected at least {MIN_SPAN:g}x):"
                       f" {exp} is weakly identified")
    for i, name in ((2, "alpha"), (4, "beta")):
        if high[i] - low[i] > abs(values[i]):
            out.append(f"{name}'s interval [{low[i]:.3g}, {high[i]:.3g}] is wider than {name}"
                       f" = {values[i]:.3g}: the runs do not identify it")
    return out


def interval(samples) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap samples (NaNs left out)."""
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    if not len(s):
        return math.nan, math.nan
    return float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))


def predict(f: Fit, N, D) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fitted loss at (N, D) -> value, 95% low, 95% high (over the bootstrap's constants)."""
    value = loss([f.values[k] for k in NAMES], N, D)
    reps = loss(f.replicates, N, D)
    return value, np.percentile(reps, 2.5, axis=0), np.percentile(reps, 97.5, axis=0)


# --- compute-optimal size ---------------------------------------------------------------------

def flops_model(N, flops_per_tok) -> tuple[float, float]:
    """log(FLOPs per token) = c0 + c1 log N, least squares over the study's shapes -> (c0, c1):
    how compute per token grows with N at the study's proportions. Without FLOPs (a table
    from elsewhere), 6N: (log 6, 1)."""
    N, F = np.asarray(N, float), np.asarray(flops_per_tok, float)
    if len(np.unique(N)) < 2:
        return math.log(6.0), 1.0
    r = stats.linregress(np.log(N), np.log(F))
    return float(r.intercept), float(r.slope)


def optimal(constants, C: float, flops: tuple[float, float]) -> tuple[float, float]:
    """N*, D* minimising L(N, D) under F(N) D = C, F(N) = exp(c0) N^c1 -> (N*, D*)."""
    E, A, alpha, B, beta = constants
    c0, c1 = flops
    logC = math.log(C)

    def f(logN):  # L along the budget; D = C / F(N)
        logD = logC - c0 - c1 * logN
        return A * math.exp(-alpha * logN) + B * math.exp(-beta * logD)

    hi = (logC - c0) / c1  # one token
    r = optimize.minimize_scalar(f, bounds=(0.0, hi), method="bounded",
                                 options={"xatol": 1e-6})
    return math.exp(r.x), math.exp(logC - c0 - c1 * r.x)


def optimal_table(f: Fit, budgets, flops: tuple[float, float]) -> list[dict]:
    """For each compute budget C: N*, D* with their 95% bootstrap intervals."""
    rows = []
    for C in budgets:
        n, d = optimal([f.values[k] for k in NAMES], C, flops)
        reps = np.array([optimal(r, C, flops) for r in f.replicates])
        (nl, nh), (dl, dh) = interval(reps[:, 0]), interval(reps[:, 1])
        rows.append({"C": float(C), "N": n, "N_low": nl, "N_high": nh,
                     "D": d, "D_low": dl, "D_high": dh})
    return rows


# --- tables ---------------------------------------------------------------------------------

def read_table(path) -> dict[str, np.ndarray]:
    """A CSV with columns N, D and loss (others kept: C, run, ...) -> columns as arrays;
    FitError for a missing file, a missing column or a value that is not a number."""
    path = pathlib.Path(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as e:
        raise FitError(f"--fit {path}: cannot read it ({e.strerror}); expected a CSV"
                       " file") from None
    fields = set(rows[0]) if rows else set()
    missing = [k for k in ("N", "D", "loss") if k not in fields]
    if missing:
        raise FitError(f"--fit {path}: no column {', '.join(missing)}; expected columns N, D and"
                       " loss (one row per run)")
    out = {}
    for k in fields:
        try:
            out[k] = np.array([float(r[k]) for r in rows])
        except (TypeError, ValueError):
            if k in ("N", "D", "loss"):
                bad = next(r[k] for r in rows if not _is_number(r[k]))
                raise FitError(f"--fit {path}: column {k} holds {bad!r}; expected"
                               " numbers") from None
            out[k] = np.array([r[k] for r in rows], dtype=object)  # text: run, shape
    return out


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


# --- the whole analysis of a table ------------------------------------------------------------

def held_out(N, D, L, groups=None, resamples: int = 200, seed: int = 0) -> dict:
    """Fit without the largest N, predict its points -> rows of prediction, 95% interval and
    measured loss; {"refused": why} when the rest cannot identify the law."""
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    top = N == N.max()
    groups = np.arange(len(N)) if groups is None else np.asarray(groups)
    try:
        f = fit(N[~top], D[~top], L[~top], groups=groups[~top], resamples=resamples, seed=seed)
    except FitError as e:
        return {"N": float(N.max()), "refused": str(e)}
    value, lo, hi = predict(f, N[top], D[top])
    rows = [{"N": float(n), "D": float(d), "predicted": float(v), "low": float(a),
             "high": float(b), "measured": float(m)}
            for n, d, v, a, b, m in zip(N[top], D[top], value, lo, hi, L[top])]
    return {"N": float(N.max()), "rows": rows, "warnings": f.warnings,
            "within": sum(r["low"] <= r["measured"] <= r["high"] for r in rows)}


def analyse(rows: list[dict], key: str = "N", resamples: int = 200, seed: int = 0) -> dict:
    """Rows with `key` (N), D, loss and optionally C and run -> scaling_fit.json's content: the
    constants with intervals, the held-out check and N*, D* for the study's compute budgets
    and 10x the largest. C absent: C = 6 N D; run absent: each row is its own run."""
    N = np.array([r[key] for r in rows], float)
    D = np.array([r["D"] for r in rows], float)
    L = np.array([r["loss"] for r in rows], float)
    C = np.array([r.get("C", math.nan) for r in rows], float)
    groups = np.array([str(r.get("run", i)) for i, r in enumerate(rows)])
    f = fit(N, D, L, groups=groups, resamples=resamples, seed=seed)
    flops = flops_model(N, C / D) if np.all(np.isfinite(C)) else (math.log(6.0), 1.0)
    C = C if np.all(np.isfinite(C)) else 6.0 * N * D
    budgets = sorted({float(C.min()), float(C.max()), 10.0 * float(C.max())})
    return {**f.to_json(), "objective": f.objective, "key": key,
            "flops_per_token": {"log_c0": flops[0], "c1": flops[1],
                                "form": "F(N) = exp(log_c0) * N^c1, least squares over the runs"},
            "held_out": held_out(N, D, L, groups, resamples, seed),
            "optimal": optimal_table(f, budgets, flops)}
