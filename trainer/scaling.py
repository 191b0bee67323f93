"""Scaling laws fitted to a sweep's rungs (Gao et al. 2024, Section 3.1).

Two forms, both fitted by least squares on log L (every rung counts by its relative error, as the
log-log plots read):

    n series at fixed k:  L(n)    = c + a * n^(-alpha)                                   (c: irreducible)
    joint in n and k:     L(n, k) = exp(alpha + beta_k log k + beta_n log n + gamma log k log n)
                                    + exp(zeta + eta log k)                          (the paper's form)

In the joint form the exponent of n at a given k is -(beta_n + gamma log k). A parameter the grid
cannot identify is held at 0 and listed as fixed: gamma needs a k series at two or more n.
Intervals are profile-likelihood intervals: the values of one parameter for which the best fit of
the others keeps RSS <= RSS_min * (1 + F(level; 1, m - p) / (m - p)), m points, p free parameters
(exact for a linear model, and far better than Wald intervals for exponents). With m = p the fit
is exact and has no interval (null).

DIR/scaling.json (written by `saescope sweep`, read by the web app's scaling page):

    version            1
    k                  k of the n series
    interval           {"method": "profile", "level": 0.95}
    rungs              one per run folder, smallest first: {run (path relative to DIR), n_latents,
                       k, fvu, delta_ce (null when not evaluated), dead_fraction, l0, train_tokens,
                       train_wall_s, ablation_sparsity and ablation_sparsity_random, probe_loss,
                       probe_residual_loss, probe_dense_loss and probe_base_entropy (null when not measured)}
    fits               {"fvu_n", "delta_ce_n", "fvu_joint", "delta_ce_joint"}, each either a fit or
                       {"skipped": why}. A fit is:
        metric, form, variables ("n" or "n", "k")
        params         {name: {value, low, high, fixed}} (low/high null without an interval;
                       +-inf as null too, with the side's flag "low_open"/"high_open" true)
        n_exponent     joint fits only: {str(k): -(beta_n + gamma log k)} for every k in the grid
        r2, r2_log     1 - RSS/TSS of L and of log L;  rmse_log: sqrt(RSS_log / m)
        n_points, dof  m and m - p
        points         [{n, k, observed, fitted}]
        curve          [{n, k, value}]: the fitted law on 41 log-spaced n from min/2 to max*2, for
                       every k in the fit (for drawing the line)
    paper              the paper's reference values quoted in REFERENCE.md, for the comparison
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import optimize, stats

from trainer import runfolder
from trainer.files import write_json
from trainer.formats import CFG_FILE
from trainer.runconfig import RunConfig

LEVEL = 0.95
PAPER = {
    "compute_law": "L(C) = 0.09 + 0.056 C^-0.084 (GPT-4, normalised MSE against compute; REFERENCE.md)",
    "compute_exponent": 0.084,
}


@dataclass(frozen=True)
class Law:
    form: str
    names: tuple[str, ...]
    predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (params, n, k) -> L
    lower: tuple[float, ...]
    upper: tuple[float, ...]


def _power(p, n, k):
    c, a, alpha = p
    return c + a * n ** -alpha


def _joint(p, n, k):
    alpha, beta_k, beta_n, gamma, zeta, eta = p
    log_n, log_k = np.log(n), np.log(k)
    return np.exp(alpha + beta_k * log_k + beta_n * log_n + gamma * log_k * log_n) + np.exp(zeta + eta * log_k)


POWER_LAW = Law("c + a * n^(-alpha)", ("c", "a", "alpha"), _power, (0.0, 0.0, 0.0), (np.inf, np.inf, 10.0))
JOINT_LAW = Law(
    "exp(alpha + beta_k log k + beta_n log n + gamma log k log n) + exp(zeta + eta log k)",
    ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta"), _joint, (-np.inf,) * 6, (np.inf,) * 6,
)


@dataclass
class Fit:
    law: Law
    params: np.ndarray
    free: np.ndarray  # bool per parameter
    rss: float  # of log L
    n: np.ndarray
    k: np.ndarray
    y: np.ndarray
    intervals: list = field(default_factory=list)  # (low, high) per parameter, or None

    @property
    def dof(self) -> int:
        return len(self.y) - int(self.free.sum())

    def predict(self, n, k=None) -> np.ndarray:
        n = np.asarray(n, dtype=float)
        return self.law.predict(self.params, n, np.broadcast_to(np.asarray(self.k[0] if k is None else k, dtype=float), n.shape))

    def r2(self, log: bool = False) -> float:
        f = np.log if log else (lambda v: v)
        y, fitted = f(self.y), f(self.predict(self.n, self.k))
        return float(1 - ((y - fitted) ** 2).sum() / ((y - y.mean()) ** 2).sum())


# ------------------------------------------------------------ least squares on log L


def _solve(law: Law, n, k, y, start: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, float]:
    """Best parameters with the non-free ones held at their `start` values; (params, RSS of log L)."""
    params = np.array(start, dtype=float)
    lower, upper = np.array(law.lower)[free], np.array(law.upper)[free]
    log_y = np.log(y)

    def residual(theta):
        params[free] = theta
        with np.errstate(all="ignore"):  # far out on a profile the exponentials overflow
            fitted = np.clip(np.nan_to_num(law.predict(params, n, k), nan=1e300), 1e-300, 1e300)
        return np.log(fitted) - log_y

    result = optimize.least_squares(residual, np.clip(params[free], lower, upper), bounds=(lower, upper),
                                    x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
    params[free] = result.x
    return params, float(2 * result.cost)


def _profile_interval(fit: Fit, j: int, level: float) -> tuple[float, float]:
    """Where the profile RSS of parameter j crosses the F threshold, on each side of the optimum."""
    dof = fit.dof
    threshold = fit.rss * (1 + stats.f.ppf(level, 1, dof) / dof)
    held = fit.free.copy()
    held[j] = False
    law, best = fit.law, fit.params[j]

    def excess(value: float) -> float:
        start = fit.params.copy()
        start[j] = value
        return _solve(law, fit.n, fit.k, fit.y, start, held)[1] - threshold

    step = max(abs(best) * 0.05, 1e-3)
    ends = []
    for direction, bound in ((-1, law.lower[j]), (1, law.upper[j])):
        inner, end = best, direction * math.inf
        for _ in range(40):  # walk outwards, doubling the step, until the profile leaves the region
            outer = best + direction * step
            at_bound = (outer - bound) * direction >= 0
            outer = bound if at_bound else outer
            if excess(outer) > 0:
                end = optimize.brentq(excess, min(inner, outer), max(inner, outer), xtol=1e-6 * (1 + abs(best)))
                break
            if at_bound:  # the region reaches the parameter's bound (c = 0, say)
                end = bound
                break
            inner, step = outer, step * 2
        ends.append(end)
    return ends[0], ends[1]


def fit_law(law: Law, n, k, y, start, fixed: tuple[str, ...] = (), level: float = LEVEL) -> Fit:
    """Least squares from `start`, then profile intervals for every free parameter."""
    n, k, y = (np.asarray(v, dtype=float) for v in (n, k, y))
    free = np.array([name not in fixed for name in law.names])
    params, rss = _solve(law, n, k, y, np.asarray(start, dtype=float), free)
    fit = Fit(law, params, free, rss, n, k, y)
    fit.intervals = [
        _profile_interval(fit, j, level) if free[j] and fit.dof > 0 and rss > 0 else None
        for j in range(len(law.names))
    ]
    return fit


def fit_power_law(n, y, level: float = LEVEL) -> Fit:
    """L(n) = c + a n^-alpha. Start: for each alpha on a grid, c and a by linear least squares on
    relative errors; the best of those is polished on log L."""
    n, y = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    best = None
    for alpha in np.linspace(0.005, 3, 600):
        design = np.stack([np.ones_like(n), n ** -alpha], 1) / y[:, None]  # relative errors
        (c, a), *_ = np.linalg.lstsq(design, np.ones_like(n), rcond=None)
        c, a = max(c, 0.0), max(a, 1e-12)
        rss = float(((np.log(c + a * n ** -alpha) - np.log(y)) ** 2).sum())
        if best is None or rss < best[0]:
            best = (rss, (c, a, alpha))
    return fit_law(POWER_LAW, n, np.ones_like(n), y, best[1], level=level)


def fit_joint_law(n, k, y, level: float = LEVEL) -> Fit:
    """The paper's L(n, k), started from a power law through the rungs at the most common k, with
    gamma held at 0 unless two or more n each have two or more k."""
    n, k, y = (np.asarray(v, dtype=float) for v in (n, k, y))
    ks_per_n = {value: len(set(k[n == value])) for value in set(n)}
    fixed = () if sum(count >= 2 for count in ks_per_n.values()) >= 2 else ("gamma",)
    k0 = max(set(k), key=lambda value: (k == value).sum())
    at_k0 = k == k0
    base = fit_power_law(n[at_k0], y[at_k0], level).params if at_k0.sum() >= 3 else (y.min() / 2, y.max(), 0.2)
    c, a, alpha_n = max(base[0], 0.05 * y.min()), max(base[1], 1e-12), base[2]
    fits = []
    for beta_k in (-0.5, 0.0, 0.5):
        for eta in (-0.5, 0.0, 0.5):
            start = (math.log(a) - beta_k * math.log(k0), beta_k, -alpha_n, 0.0, math.log(c) - eta * math.log(k0), eta)
            free = np.array([name not in fixed for name in JOINT_LAW.names])
            fits.append(_solve(JOINT_LAW, n, k, y, np.array(start), free))
    params, _ = min(fits, key=lambda result: result[1])
    return fit_law(JOINT_LAW, n, k, y, params, fixed, level)


# ------------------------------------------------------------ scaling.json


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def fit_to_json(fit: Fit, metric: str) -> dict:
    params = {}
    for j, name in enumerate(fit.law.names):
        low, high = fit.intervals[j] if fit.intervals[j] else (None, None)
        params[name] = {
            "value": float(fit.params[j]),
            "low": _finite(low) if low is not None else None,
            "high": _finite(high) if high is not None else None,
            "low_open": low is not None and not math.isfinite(low),
            "high_open": high is not None and not math.isfinite(high),
            "fixed": not bool(fit.free[j]),
        }
    ks = sorted(set(fit.k.tolist()))
    grid = np.geomspace(fit.n.min() / 2, fit.n.max() * 2, 41)
    out = {
        "metric": metric,
        "form": fit.law.form,
        "variables": ["n"] if fit.law is POWER_LAW else ["n", "k"],
        "params": params,
        "r2": fit.r2(),
        "r2_log": fit.r2(log=True),
        "rmse_log": math.sqrt(fit.rss / len(fit.y)),
        "n_points": len(fit.y),
        "dof": fit.dof,
        "points": [{"n": int(n), "k": int(k), "observed": float(y), "fitted": float(f)}
                   for n, k, y, f in zip(fit.n, fit.k, fit.y, fit.predict(fit.n, fit.k))],
        "curve": [{"n": float(n), "k": int(k), "value": float(v)} for k in ks for n, v in zip(grid, fit.predict(grid, k))],
    }
    if fit.law is JOINT_LAW:
        beta_n, gamma = fit.params[2], fit.params[3]
        out["n_exponent"] = {str(int(k)): float(-(beta_n + gamma * math.log(k))) for k in ks}
    return out


def read_rungs(sweep_dir: Path) -> list[dict]:
    """Each evaluated run folder under DIR/runs as a row of scaling.json's `rungs`."""
    rungs = []
    for run in sorted((Path(sweep_dir) / "runs").iterdir()):
        metrics = runfolder.load_metrics(run)
        if "fvu" not in metrics or not (run / CFG_FILE).exists():
            continue
        cfg = RunConfig.load(run)
        rungs.append({
            "run": str(run.relative_to(sweep_dir)),
            "n_latents": cfg.n_latents, "k": cfg.k,
            **{key: metrics.get(key) for key in ("fvu", "delta_ce", "dead_fraction", "l0", "train_tokens", "train_wall_s",
                                                 "ablation_sparsity", "ablation_sparsity_random", "probe_loss",
                                                 "probe_residual_loss", "probe_dense_loss", "probe_base_entropy")},
        })
    return sorted(rungs, key=lambda rung: (rung["n_latents"], rung["k"]))


def scaling_fits(rungs: list[dict], k: int, level: float = LEVEL) -> dict:
    fits = {}
    for metric in ("fvu", "delta_ce"):
        rows = [rung for rung in rungs if rung[metric] is not None]
        series = [rung for rung in rows if rung["k"] == k]
        if any(rung[metric] <= 0 for rung in rows):
            reason = f"{metric} <= 0 at some rung (a log-space fit needs positive values)"
            fits[f"{metric}_n"] = fits[f"{metric}_joint"] = {"skipped": reason}
            continue
        if len(series) >= 3:
            fit = fit_power_law([r["n_latents"] for r in series], [r[metric] for r in series], level)
            fits[f"{metric}_n"] = fit_to_json(fit, metric) | {"k": k}
        else:
            fits[f"{metric}_n"] = {"skipped": f"{len(series)} rungs at k={k} with {metric}; the fit needs 3"}
        if len({r["k"] for r in rows}) >= 2 and len(rows) >= 6:
            fit = fit_joint_law([r["n_latents"] for r in rows], [r["k"] for r in rows], [r[metric] for r in rows], level)
            fits[f"{metric}_joint"] = fit_to_json(fit, metric)
        else:
            fits[f"{metric}_joint"] = {"skipped": "the joint fit needs two or more k and six or more rungs"}
    return fits


def write_scaling(sweep_dir: Path, k: int, level: float = LEVEL) -> dict:
    rungs = read_rungs(sweep_dir)
    result = {
        "version": 1,
        "k": k,
        "interval": {"method": "profile", "level": level},
        "rungs": rungs,
        "fits": scaling_fits(rungs, k, level),
        "paper": PAPER,
    }
    write_json(Path(sweep_dir) / "scaling.json", result)
    return result
