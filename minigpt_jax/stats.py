"""The statistics behind every comparison: pure functions of numbers, no runs, no files.

- `summary`: n, mean, standard deviation (n - 1 in the denominator) and the 95%
  confidence interval's half width from Student's t (`scipy.stats.t`).
- `paired`: an experiment against a reference seed by seed (seed i of every
  experiment sees the same data order): the mean difference, its 95% interval
  and the paired t-test's two-sided p-value (`scipy.stats.ttest_rel`). With one
  seed it is not made, and says why.
- `ratio_estimate` and `segment_paired`: the held-out loss (summed loss over
  label tokens) with its standard error over segments, the unit sampled; two
  runs evaluated on the same segments are compared by the standard error of
  their per-segment differences, not by two unpaired errors, which count the
  segments' shared difficulty twice.
- `seeds_to_resolve`: how many seeds a paired t-test needs to resolve a
  difference of the size observed, from the observed spread.
- `lr_sensitivity`: Wortsman et al. (2023), "Small-scale proxies for
  large-scale Transformer training instabilities", section 2.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

LEVEL = 0.95  # confidence level of every interval
ALPHA = 0.05  # a difference is called significant when its p-value is below this
POWER = 0.8  # the power `seeds_to_resolve` asks for
MAX_SEEDS = 1000  # `seeds_to_resolve` gives up above this


@dataclasses.dataclass(frozen=True)
class Summary:
    n: int  # finite values summarised
    mean: float  # NaN when n is 0
    std: float  # sample standard deviation (ddof 1); NaN below two values
    ci95: float  # half width of the 95% interval of the mean (Student's t); NaN below two


def summary(values: Sequence[float]) -> Summary:
    """Mean, standard deviation and the 95% interval's half width of the finite values."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan)
    if n == 1:
        return Summary(1, float(x[0]), math.nan, math.nan)
    std = float(np.std(x, ddof=1))
    return Summary(n, float(np.mean(x)), std, _half_width(std / math.sqrt(n), n - 1))


def _half_width(stderr: float, df: int) -> float:
    return float(sps.t.ppf(0.5 + LEVEL / 2, df) * stderr)


@dataclasses.dataclass(frozen=True)
class Paired:
    """A paired difference (value minus reference): over seeds, or over held-out segments."""

    n: int  # pairs (seeds, or segments)
    mean: float  # mean difference; positive: higher (worse, for a loss) than the reference
    ci95: float  # half width of its 95% interval; NaN when not made
    p: float  # two-sided p-value of "no difference"; NaN when not made
    std: float  # standard deviation of the differences (seeds); NaN when not made
    why_not: str = ""  # why no test was made ("" when it was)

    @property
    def made(self) -> bool:
        return not self.why_not

    @property
    def significant(self) -> bool:
        return self.made and self.p < ALPHA


def paired(values: Sequence[float], reference: Sequence[float]) -> Paired:
    """values[i] - reference[i] over seeds i: mean, 95% interval, paired t-test p-value.

    Pairs where either side is missing or not finite (a failed seed) are left out. Below two
    pairs the test is not made; `why_not` says so.
    """
    a = np.asarray([math.nan if v is None else v for v in values], np.float64)
    b = np.asarray([math.nan if v is None else v for v in reference], np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired: {len(a)} values against {len(b)} reference values;"
                         " expected one per seed on both sides")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        why = ("no seed finished on both sides" if n == 0 else
               "one seed only: there is no spread between seeds to test the difference against"
               " (run with --seeds 2 or more)")
        return Paired(n, mean, math.nan, math.nan, math.nan, why)
    std = float(np.std(d, ddof=1))
    if std == 0.0:
        why = ("identical on every seed" if mean == 0.0 else
               "the same difference on every seed: no spread to test it against")
        return Paired(n, mean, math.nan, math.nan, std, why)
    with warnings.catch_warnings():  # near-identical pairs: scipy warns of precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(sps.ttest_rel(a, b).pvalue)
    return Paired(n, mean, _half_width(std / math.sqrt(n), n - 1), p, std)


def ratio_estimate(loss_sums, counts) -> tuple[float, float, int]:
    """(sum of losses / sum of label counts, its standard error over segments, segments).

    The ratio estimator over m sampled segments (those with at least one label); the
    standard error is NaN below two segments.
    """
    s, n = np.asarray(loss_sums, np.float64).ravel(), np.asarray(counts, np.float64).ravel()
    keep = n > 0
    s, n = s[keep], n[keep]
    total, m = float(n.sum()), len(n)
    loss = float(s.sum()) / max(total, 1.0)
    stderr = (math.sqrt(float(((s - loss * n) ** 2).sum()) / (m * (m - 1))) / (total / m)
              if m > 1 else math.nan)
    return loss, stderr, m


def segment_paired(sums, reference_sums, counts) -> Paired:
    """Held-out loss of one run minus another's, evaluated on the same segments (same label
    counts): the ratio estimate of the per-segment differences, its standard error, and a
    two-sided t-test over segments (m - 1 degrees of freedom)."""
    diff = np.asarray(sums, np.float64) - np.asarray(reference_sums, np.float64)
    mean, se, m = ratio_estimate(diff, counts)
    if not (m > 1 and math.isfinite(se)):
        return Paired(m, mean, math.nan, math.nan, math.nan,
                      "fewer than two held-out segments, or a non-finite loss")
    if se == 0.0:
        return Paired(m, mean, 0.0, math.nan, math.nan, "identical on every held-out segment")
    p = float(2 * sps.t.sf(abs(mean) / se, m - 1))
    return Paired(m, mean, _half_width(se, m - 1), p, math.nan)


def unpaired(a: float, a_stderr: float, b: float, b_stderr: float) -> Paired:
    """a - b from two independent estimates with standard errors (runs evaluated on different
    held-out segments): normal interval and two-sided p-value."""
    se = math.hypot(a_stderr, b_stderr)
    if not (math.isfinite(se) and math.isfinite(a) and math.isfinite(b)) or se == 0.0:
        return Paired(0, a - b, math.nan, math.nan, math.nan, "no standard error to test it against")
    z = sps.norm.ppf(0.5 + LEVEL / 2)
    return Paired(0, a - b, float(z * se), float(2 * sps.norm.sf(abs(a - b) / se)), math.nan)


def paired_power(effect: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with n pairs when the true mean difference is
    `effect` standard deviations of the differences (the noncentral t, `scipy.stats.nct`)."""
    df, nc = n - 1, abs(effect) * math.sqrt(n)
    crit = sps.t.ppf(1 - alpha / 2, df)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        power = float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))
    if not math.isfinite(power):  # scipy's nct fails far in the tail: its normal limit
        power = float(sps.norm.sf(crit - nc) + sps.norm.cdf(-crit - nc))
    return power


def seeds_to_resolve(mean: float, std: float, power: float = POWER,
                     alpha: float = ALPHA) -> int | None:
    """The fewest seeds (at least 2) with which a paired t-test at `alpha` (two-sided) has
    `power` to detect a mean difference `mean` when the differences between seeds spread with
    standard deviation `std` (both as observed; `paired_power`). None when it cannot be
    estimated (no spread measured, no difference) or needs more than MAX_SEEDS."""
    if not (math.isfinite(mean) and math.isfinite(std)) or mean == 0.0:
        return None
    if std == 0.0:
        return 2
    effect = abs(mean) / std
    lo, hi = 2, MAX_SEEDS
    if paired_power(effect, hi, alpha) < power:
        return None
    while lo < hi:  # power grows with n
        mid = (lo + hi) // 2
        if paired_power(effect, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def lr_sensitivity(init_losses: Sequence[float], final_losses: Sequence[float]) -> float:
    """Wortsman et al.'s LR sensitivity of one sweep (one seed): the mean over the swept
    learning rates of min(loss at initialisation, final loss at that lr), minus the best final
    loss of the sweep. A diverged lr (final loss missing or not finite) counts as its loss at
    initialisation. NaN when no lr has a finite final loss."""
    init = np.asarray(init_losses, np.float64)
    final = np.asarray([math.nan if v is None else v for v in final_losses], np.float64)
    final = np.where(np.isfinite(final), final, np.nan)
    if not np.isfinite(final).any():
        return math.nan
    return float(np.mean(np.fmin(init, final)) - np.nanmin(final))
