"""Fit and plot a sweep: python -m eval.scaling runs/SWEEP [--out DIR] [--boot 200] [--loss final|best]

Reads the sweep index (runs/SWEEP/index.jsonl, written by python -m launch.sweep) and fits, per objective:
- Chinchilla approach 2: per compute budget an IsoFLOP parabola of loss in log N; its vertex gives N_opt(C), and
  D_opt(C) is read off the budget's own runs (log D is linear in log N at fixed C); power laws N_opt ~ C^a,
  D_opt ~ C^b over the budgets whose vertex lies inside their sizes (n/a with fewer than two); the parabola
  minima give the loss frontier L*(C) ~ C^k (where a budget's vertex falls outside its sizes, or it has no
  minimum, its lowest observed loss stands in, and the table says so).
- Chinchilla approach 3: L(N, D) = E + A / N^alpha + B / D^beta, a Huber loss (delta 1e-3) on log-loss,
  scipy L-BFGS-B from a grid of initialisations; compute-optimal exponents a = beta/(alpha+beta), b = alpha/(alpha+beta).
- the compute multiplier: C_MDM / C_AR at equal loss on the two frontiers, at each AR budget.
- data-constrained sweeps (runs with unique_tokens): Muennighoff et al.'s effective data
  D' = U_D + U_D R* (1 - exp(-R_D / R*)), U_D = min(D, U), R_D = D / U_D - 1, in L = E + A / N^alpha + B / D'^beta,
  with the repeat half-life R* = R*_D fitted per objective (the A term folds into E when the sweep has one size).
Confidence intervals: 95% percentile bootstrap. Approach 2 (and the frontier and multiplier) uses a parametric
bootstrap: each loss redrawn around its fitted parabola with its own standard error plus the pooled parabola
residual variance; approach 3 a residual bootstrap (fitted log-loss + resampled residuals); the data-constrained
fit resamples runs with replacement.
N is the non-embedding parameter count (--params total for all parameters); C the run's training FLOPs as counted
by pretrain/loop/flops.py; D the tokens it trained on. Outputs: PNG figures, scaling.json and scaling.md under --out.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.optimize import minimize

OBJ_STYLE = {"mdm": ("tab:blue", "o", "MDM"), "ar": ("tab:red", "s", "AR")}


def _single_threaded(fn):
    """Run with one BLAS thread: these fits are thousands of tiny solves, and a BLAS thread pool on a busy CPU
    spins instead of working (10x slower measured on a shared 2-core machine)."""
    import functools
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with threadpool_limits(1):
            return fn(*args, **kwargs)
    return wrapped


# ----------------------------------------------------------------------------- reading

def load_index(path) -> list[dict]:
    p = Path(path)
    f = p / "index.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist: run the sweep first (python -m launch.sweep run ...)")
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{f} holds no finished runs yet")
    return rows


def _xy(rows, loss: str, params: str):
    N = np.array([r["params_nonembed" if params == "nonembed" else "params_total"] for r in rows], float)
    D = np.array([r["tokens"] for r in rows], float)
    C = np.array([r["flops"] for r in rows], float)
    L = np.array([r[f"{loss}_nelbo"] for r in rows], float)
    S = np.array([r[f"{loss}_stderr"] for r in rows], float)
    return N, D, C, L, S


def _ci(samples, level=0.95) -> list[float]:
    s = np.asarray([x for x in samples if np.isfinite(x)], float)
    if len(s) < 10:
        return [float("nan"), float("nan")]
    return [float(np.quantile(s, (1 - level) / 2)), float(np.quantile(s, 1 - (1 - level) / 2))]


# ----------------------------------------------------------------------------- approach 2: IsoFLOP parabolas

def fit_parabola(x, y, w=None) -> Optional[tuple[float, float, float]]:
    """y = k (x - x0)^2 + c by weighted least squares; None without a minimum (k <= 0) or with < 3 points."""
    if len(np.unique(x)) < 3:
        return None
    p2, p1, p0 = np.polyfit(x, y, 2, w=w)
    if not p2 > 0:
        return None
    x0 = -p1 / (2 * p2)
    return float(p2), float(x0), float(p0 - p2 * x0 * x0)


def _budget_groups(C_planned):
    groups: dict = {}
    for i, c in enumerate(C_planned):
        groups.setdefault(float(c), []).append(i)
    return dict(sorted(groups.items()))


def _power_law(x, y):
    """log y = log k + e log x by least squares: (e, log k)."""
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2 or len(np.unique(x[ok])) < 2:
        return float("nan"), float("nan")
    e, lk = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
    return float(e), float(lk)


def _isoflop_once(N, D, C, L, budgets, groups, w=None):
    """Per budget (N_opt, D_opt, L_min) and the power laws over budgets."""
    out = []
    for b in budgets:
        idx = groups[b]
        x = np.log(N[idx])
        fit = fit_parabola(x, L[idx], None if w is None else w[idx])
        lowest = float(np.min(L[idx]))  # the frontier's point when the parabola has no minimum inside the grid
        if fit is None:
            out.append((float("nan"), float("nan"), lowest, None, False))
            continue
        k, x0, c = fit
        slope, icpt = np.polyfit(x, np.log(D[idx]), 1)  # log D ~ log N at fixed C
        inside = x.min() <= x0 <= x.max()
        if abs(x0 - x.mean()) > 10:  # a nearly flat parabola: its vertex says nothing about this grid
            out.append((float("nan"), float("nan"), lowest, fit, False))
            continue
        out.append((math.exp(x0), math.exp(icpt + slope * x0), c if inside else lowest, fit, inside))
    Cs = np.array([float(np.mean(C[groups[b]])) for b in budgets])
    n_opt = np.array([o[0] for o in out])
    d_opt = np.array([o[1] for o in out])
    l_min = np.array([o[2] for o in out])
    # The exponents use only vertices inside their budget's sizes: an extrapolated vertex is a guess about sizes
    # that were not trained, and a parabola's far tail is where it is least right.
    inside = np.array([o[4] for o in out])
    a, la = _power_law(Cs, np.where(inside, n_opt, np.nan))
    bb, lb = _power_law(Cs, np.where(inside, d_opt, np.nan))
    k, lk = _power_law(Cs, l_min)
    return {"C": Cs, "n_opt": n_opt, "d_opt": d_opt, "l_min": l_min, "fits": [o[3] for o in out], "inside": inside,
            "a": a, "log_ka": la, "b": bb, "log_kb": lb, "k": k, "log_kl": lk}


@_single_threaded
def isoflop_fit(N, D, C, L, S, budgets_planned, *, boot: int = 200, seed: int = 0) -> dict:
    """Chinchilla approach 2 with a parametric bootstrap (see the module docstring)."""
    groups = _budget_groups(budgets_planned)
    budgets = list(groups)
    base = _isoflop_once(N, D, C, L, budgets, groups)
    # Pooled residual variance of the parabolas: scatter beyond the Monte Carlo error (seeds, optimisation).
    resid, dof = 0.0, 0
    yhat = np.full(len(L), np.nan)
    for b, fit in zip(budgets, base["fits"]):
        idx = groups[b]
        if fit is None:
            continue
        k, x0, c = fit
        yhat[idx] = k * (np.log(N[idx]) - x0) ** 2 + c
        resid += float(((L[idx] - yhat[idx]) ** 2).sum())
        dof += len(idx) - 3
    s2 = resid / dof if dof > 0 else 0.0
    sigma = np.sqrt(S ** 2 + s2)
    centre = np.where(np.isfinite(yhat), yhat, L)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(boot):
        Lb = centre + rng.standard_normal(len(L)) * sigma
        reps.append(_isoflop_once(N, D, C, Lb, budgets, groups))
    per_budget = []
    for j, b in enumerate(budgets):
        n_opt = base["n_opt"][j]
        per_budget.append({
            "budget": b, "flops": float(base["C"][j]), "n_opt": float(n_opt), "d_opt": float(base["d_opt"][j]),
            "l_min": float(base["l_min"][j]),
            "n_opt_ci": _ci([r["n_opt"][j] for r in reps]), "d_opt_ci": _ci([r["d_opt"][j] for r in reps]),
            "l_min_ci": _ci([r["l_min"][j] for r in reps]),
            "no_minimum_share": float(np.mean([not np.isfinite(r["n_opt"][j]) for r in reps])) if reps else 0.0,
            "inside_grid": bool(base["inside"][j]),
            "parabola": None if base["fits"][j] is None else dict(zip(("k", "log_n_opt", "l_min"), base["fits"][j])),
        })
    return {"per_budget": per_budget, "a": base["a"], "a_ci": _ci([r["a"] for r in reps]),
            "b": base["b"], "b_ci": _ci([r["b"] for r in reps]), "log_ka": base["log_ka"], "log_kb": base["log_kb"],
            "frontier_exponent": base["k"], "frontier_exponent_ci": _ci([r["k"] for r in reps]),
            "frontier_log_k": base["log_kl"], "residual_sd": math.sqrt(s2),
            "_reps": [(r["k"], r["log_kl"]) for r in reps]}


# ----------------------------------------------------------------------------- approach 3: L(N, D)

def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _log_pred(theta, logN, logD):
    """log(E + A/N^alpha + B/D^beta) with theta = (e, a, alpha, b, beta), E = exp(e), A = exp(a), B = exp(b)."""
    e, a, al, b, be = theta
    return np.logaddexp(np.logaddexp(a - al * logN, b - be * logD), e)


def _objective(th, logN, logD, logL, delta):
    """Huber loss of the log-loss residuals and its exact gradient (numeric gradients make L-BFGS-B crawl)."""
    e, a, al, b, be = th
    t = np.stack([a - al * logN, b - be * logD, np.full_like(logN, e)])
    top = t.max(0)
    w = np.exp(t - top)
    z = w.sum(0)
    r = top + np.log(z) - logL
    w /= z  # d log_pred / d t_k
    psi = np.clip(r, -delta, delta)
    grad = np.array([(psi * w[2]).sum(), (psi * w[0]).sum(), -(psi * w[0] * logN).sum(), (psi * w[1]).sum(),
                     -(psi * w[1] * logD).sum()])
    return float(_huber(r, delta).sum()), grad


def _fit_theta(logN, logD, logL, inits, delta):
    best = None
    bounds = [(-10, 5), (-10, 30), (0.0, 3.0), (-10, 30), (0.0, 3.0)]
    for th0 in inits:
        res = minimize(_objective, np.asarray(th0, float), args=(logN, logD, logL, delta), jac=True,
                       method="L-BFGS-B", bounds=bounds, options={"ftol": 1e-13, "gtol": 1e-11, "maxiter": 2000})
        if best is None or res.fun < best.fun:
            best = res
    return best.x


@_single_threaded
def parametric_fit(N, D, L, *, boot: int = 200, seed: int = 0, delta: float = 1e-3) -> dict:
    """Chinchilla approach 3: Huber loss on log-loss, best of a grid of initialisations; case bootstrap."""
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    grid = [(e, a, al, b, be) for e in (-0.5, 0.7, 1.5) for a in (0.0, 6.0) for al in (0.25, 0.8)
            for b in (0.0, 6.0) for be in (0.25, 0.8)]
    theta = _fit_theta(logN, logD, logL, grid, delta)
    rng = np.random.default_rng(seed)
    local = [theta, theta + rng.normal(0, [0.3, 1.0, 0.1, 1.0, 0.1])]
    # Residual bootstrap: the fitted log-losses plus resampled residuals (case resampling of a near-L1 fit
    # keeps reusing the same few points and gives intervals that are too narrow).
    fitted = _log_pred(theta, logN, logD)
    resid = (logL - fitted) * math.sqrt(len(L) / max(len(L) - 5, 1))  # residuals shrink by the 5 fitted parameters
    reps = []
    for _ in range(boot):
        reps.append(_fit_theta(logN, logD, fitted + rng.choice(resid, len(resid)), local, delta))
    reps = np.array(reps) if reps else np.zeros((0, 5))

    def derived(th):
        e, a, al, b, be = th
        return {"E": math.exp(e), "A": math.exp(a), "alpha": al, "B": math.exp(b), "beta": be,
                "a": be / (al + be) if al + be > 0 else float("nan"),
                "b": al / (al + be) if al + be > 0 else float("nan")}
    point = derived(theta)
    boots = [derived(t) for t in reps]
    out = {k: float(v) for k, v in point.items()}
    for k in point:
        out[f"{k}_ci"] = _ci([bt[k] for bt in boots])
    pred = np.exp(_log_pred(theta, logN, logD))
    out["rms_log_residual"] = float(np.sqrt(np.mean((np.log(pred) - logL) ** 2)))
    out["_theta"] = theta.tolist()
    return out


# ----------------------------------------------------------------------------- data-constrained: R*_D

def effective_data(D, U, r_star):
    """Muennighoff et al. (2023): U_D + U_D R* (1 - exp(-R_D / R*)), U_D = min(D, U), R_D = D / U_D - 1."""
    UD = np.minimum(D, U)
    RD = D / UD - 1
    return UD + UD * r_star * (1 - np.exp(-RD / r_star))


@_single_threaded
def repeat_fit(N, D, U, L, *, boot: int = 200, seed: int = 0, delta: float = 1e-3) -> dict:
    """L = E + A / N^alpha + B / D'^beta with D' = effective_data(D, U, R*); a single size folds A into E."""
    one_size = len(np.unique(N)) == 1
    logL = np.log(L)

    def pred(th, idx):
        if one_size:
            e, b, be, lr = th
            return np.logaddexp(e, b - be * np.log(effective_data(D[idx], U[idx], math.exp(lr))))
        e, a, al, b, be, lr = th
        return np.logaddexp(np.logaddexp(e, a - al * np.log(N[idx])),
                            b - be * np.log(effective_data(D[idx], U[idx], math.exp(lr))))

    bounds = ([(-10, 5), (-10, 30), (0.0, 3.0), (math.log(0.05), math.log(1e4))] if one_size else
              [(-10, 5), (-10, 30), (0.0, 3.0), (-10, 30), (0.0, 3.0), (math.log(0.05), math.log(1e4))])

    def fit(idx, inits):
        best = None
        for th0 in inits:
            res = minimize(lambda th: _huber(pred(th, idx) - logL[idx], delta).sum(), np.asarray(th0, float),
                           method="L-BFGS-B", bounds=bounds)
            if best is None or res.fun < best.fun:
                best = res
        return best.x

    lrs = [math.log(r) for r in (0.5, 2.0, 8.0, 32.0, 128.0)]
    if one_size:
        grid = [(e, b, be, lr) for e in (0.0, 1.5) for b in (1.0, 6.0) for be in (0.2, 0.6) for lr in lrs]
    else:
        grid = [(e, a, al, b, be, lr) for e in (-1.0, 1.0) for a in (0.0, 6.0) for al in (0.3, 0.8)
                for b in (0.0, 6.0) for be in (0.3, 0.8) for lr in lrs]
    all_idx = np.arange(len(L))
    theta = fit(all_idx, grid)
    rng = np.random.default_rng(seed)
    # Bootstrap fits start at the fit and at R* / 4 and 4 R*: R* sits in a flat valley, and one start would pin it.
    local = [theta] + [np.r_[theta[:-1], np.clip(theta[-1] + math.log(f), bounds[-1][0], bounds[-1][1])]
                       for f in (0.25, 4.0)]
    reps = [fit(rng.integers(0, len(L), len(L)), local) for _ in range(boot)]
    r_star = math.exp(theta[-1])
    return {"r_star": r_star, "r_star_ci": _ci([math.exp(t[-1]) for t in reps]), "one_size": one_size,
            "beta": float(theta[2] if one_size else theta[4]),
            "rms_log_residual": float(np.sqrt(np.mean((pred(theta, all_idx) - logL) ** 2))),
            "_theta": [float(t) for t in theta], "_pred": pred}


# ----------------------------------------------------------------------------- the compute multiplier

def compute_multiplier(iso: dict, boot_pairs: dict, obj: str = "mdm") -> dict:
    """C_obj / C_AR at equal frontier loss, at each AR budget: L*(C) = exp(log_k) C^k per objective (obj: mdm,
    or any other diffusion objective of the sweep: uniform, hybrid, ...)."""
    m, a = iso[obj], iso["ar"]

    def mult(km, lkm, ka, lka, C):
        if not all(np.isfinite([km, lkm, ka, lka])) or km == 0:
            return float("nan")
        log_loss = lka + ka * math.log(C)
        return math.exp(min((log_loss - lkm) / km - math.log(C), 700.0))  # far extrapolations overflow

    out = []
    for pb in a["per_budget"]:
        C = pb["flops"]
        point = mult(m["frontier_exponent"], m["frontier_log_k"], a["frontier_exponent"], a["frontier_log_k"], C)
        reps = [mult(km, lkm, ka, lka, C) for (km, lkm), (ka, lka) in zip(boot_pairs[obj], boot_pairs["ar"])]
        out.append({"ar_flops": C, "multiplier": point, "ci": _ci(reps)})
    # The same ratio read at MDM's frontier points on AR's frontier: at MDM budget C with frontier loss L, AR needs
    # C_AR(L) = (L / k_AR)^(1 / e_AR); in range when L lies within AR's own frontier losses (no extrapolation).
    ar_losses = [pb["l_min"] for pb in a["per_budget"]]
    by_mdm = []
    for j, pb in enumerate(m["per_budget"]):
        C, Lm = pb["flops"], pb["l_min"]

        def inv(ka, lka, L=Lm):
            if not (np.isfinite([ka, lka]).all() and ka != 0):
                return float("nan")
            return math.exp(max(min((math.log(L) - lka) / ka, 700.0), -700.0))
        point = C / inv(a["frontier_exponent"], a["frontier_log_k"])
        reps = [C / inv(ka, lka) for ka, lka in boot_pairs["ar"]]
        by_mdm.append({"mdm_flops": C, "mdm_loss": Lm, "multiplier": point, "ci": _ci(reps),
                       "in_range": bool(min(ar_losses) <= Lm <= max(ar_losses))})
    inr = [o["multiplier"] for o in by_mdm if o["in_range"] and o["multiplier"] > 0]
    return {"per_ar_budget": out, "per_mdm_budget": by_mdm,
            "geomean": float(np.exp(np.mean([math.log(o["multiplier"]) for o in out if o["multiplier"] > 0])))
            if out and all(o["multiplier"] > 0 for o in out) else float("nan"),
            "geomean_in_range": float(np.exp(np.mean(np.log(inr)))) if inr else float("nan")}


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_isoflop(rows_by_obj, iso, out: Path, loss: str, params: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(rows_by_obj), figsize=(5.5 * len(rows_by_obj), 4.2), squeeze=False,
                             sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, (obj, rows) in zip(axes[0], rows_by_obj.items()):
        N, D, C, L, S = _xy(rows, loss, params)
        groups = _budget_groups([r["budget"] for r in rows])
        for j, (b, idx) in enumerate(groups.items()):
            col = cmap(j / max(1, len(groups) - 1))
            ax.errorbar(N[idx], L[idx], yerr=1.96 * S[idx], fmt="o", color=col, ms=4, capsize=2,
                        label=f"C = {b:.2g}")
            pb = iso[obj]["per_budget"][j]
            if pb["parabola"]:
                xs = np.linspace(np.log(N[idx]).min() - 0.2, np.log(N[idx]).max() + 0.2, 100)
                p = pb["parabola"]
                ax.plot(np.exp(xs), p["k"] * (xs - p["log_n_opt"]) ** 2 + p["l_min"], color=col, lw=1)
                if pb["inside_grid"]:  # an extrapolated vertex is not drawn: its interval would set the axis
                    lo, hi = pb["n_opt_ci"]
                    ax.errorbar([pb["n_opt"]], [pb["l_min"]],
                                xerr=[[max(pb["n_opt"] - lo, 0) if np.isfinite(lo) else 0],
                                      [max(hi - pb["n_opt"], 0) if np.isfinite(hi) else 0]],
                                fmt="*", color=col, ms=11, mec="k", capsize=3)
        ax.set_xlim(N.min() / 1.6, N.max() * 1.6)
        ax.set_xscale("log")
        ax.set_xlabel(f"parameters N ({'non-embedding' if params == 'nonembed' else 'total'})")
        ax.set_title(f"{OBJ_STYLE.get(obj, ('k', 'o', obj))[2]}: IsoFLOP curves (star: N_opt inside the grid)",
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"held-out {loss} NELBO, nats/token (95% CI)")
    return save_figure(fig, out / "isoflop.png")


def plot_frontier(rows_by_obj, iso, mult, out: Path, loss: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for obj, rows in rows_by_obj.items():
        col, mk, label = OBJ_STYLE.get(obj, ("k", "o", obj))
        _, _, C, L, S = _xy(rows, loss, "nonembed")
        ax.errorbar(C, L, yerr=1.96 * S, fmt=mk, color=col, alpha=0.35, ms=4, capsize=1.5, label=f"{label} runs")
        it = iso.get(obj)
        if it is None or not np.isfinite(it["frontier_exponent"]):
            continue
        pb = it["per_budget"]
        xs = np.array([p["flops"] for p in pb])
        ys = np.array([p["l_min"] for p in pb])
        lo = np.array([p["l_min_ci"][0] for p in pb])
        hi = np.array([p["l_min_ci"][1] for p in pb])
        ax.errorbar(xs, ys, yerr=[np.maximum(ys - lo, 0), np.maximum(hi - ys, 0)], fmt=mk, color=col, mec="k",
                    ms=8, capsize=3, label=f"{label} IsoFLOP minima (95% CI)")
        grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 100)
        band = np.array([[math.exp(lk + k * math.log(c)) for c in grid] for k, lk in it["_reps"]
                         if np.isfinite(k) and np.isfinite(lk)])
        ax.plot(grid, np.exp(it["frontier_log_k"] + it["frontier_exponent"] * np.log(grid)), color=col,
                label=f"{label} frontier L ~ C^{it['frontier_exponent']:.3f}")
        if len(band) > 10:
            ax.fill_between(grid, np.quantile(band, 0.025, 0), np.quantile(band, 0.975, 0), color=col, alpha=0.15)
    if mult and np.isfinite(mult.get("geomean_in_range", float("nan"))):
        ax.set_title(f"loss vs compute: AR reaches MDM's loss with 1/{mult['geomean_in_range']:.2g} of its compute",
                     fontsize=9)
    else:
        ax.set_title("loss vs training compute")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (pretrain/loop/flops.py count)")
    ax.set_ylabel(f"held-out {loss} NELBO (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_figure(fig, out / "frontier.png")


def plot_optimal(iso, out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for obj, it in iso.items():
        col, mk, label = OBJ_STYLE.get(obj, ("k", "o", obj))
        pb = it["per_budget"]
        C = np.array([p["flops"] for p in pb])
        for ax, key, exp_key, lk in ((axes[0], "n_opt", "a", "log_ka"), (axes[1], "d_opt", "b", "log_kb")):
            y = np.array([p[key] for p in pb])
            lo = np.array([p[f"{key}_ci"][0] for p in pb])
            hi = np.array([p[f"{key}_ci"][1] for p in pb])
            ok = np.isfinite(y) & np.array([p["inside_grid"] for p in pb])  # as in the fit: vertices inside
            ax.errorbar(C[ok], y[ok], yerr=[np.nan_to_num(np.maximum(y - lo, 0))[ok],
                                            np.nan_to_num(np.maximum(hi - y, 0))[ok]],
                        fmt=mk, color=col, capsize=3,
                        label=None if np.isfinite(it[exp_key]) else f"{label}: < 2 vertices inside the grid")
            if np.isfinite(it[exp_key]):
                ci = it[f"{exp_key}_ci"]
                g = np.geomspace(C.min(), C.max(), 50)
                ax.plot(g, np.exp(it[lk] + it[exp_key] * np.log(g)), color=col,
                        label=f"{label}: ~C^{it[exp_key]:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]")
            ax.set_xlabel("training FLOPs")
            ax.grid(alpha=0.3, which="both")
    for ax in axes:
        ys = [np.asarray(ln.get_ydata(), float) for ln in ax.get_lines()]
        if any(len(y) for y in ys) and all(np.all(y[np.isfinite(y)] > 0) for y in ys):
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no IsoFLOP parabola has a minimum", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("N_opt (IsoFLOP vertex), 95% CI")
    axes[1].set_ylabel("D_opt (tokens), 95% CI")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("compute-optimal size and data (Chinchilla approach 2)")
    return save_figure(fig, out / "optimal.png")


def plot_repeat(rows_by_obj, rep, out: Path, loss: str, params: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.5))
    for obj, rows in rows_by_obj.items():
        col, mk, label = OBJ_STYLE.get(obj, ("k", "o", obj))
        N, D, C, L, S = _xy(rows, loss, params)
        U = np.array([r["unique"] for r in rows], float)
        epochs = D / U
        r = rep.get(obj)
        for j, b in enumerate(sorted(set(r_["budget"] for r_ in rows))):
            idx = [i for i, r_ in enumerate(rows) if r_["budget"] == b]
            order = np.argsort(epochs[idx])
            ii = np.array(idx)[order]
            ax.errorbar(epochs[ii], L[ii], yerr=1.96 * S[ii], fmt=mk, color=col, alpha=0.5 + 0.5 * j / 2,
                        capsize=2, ms=5, label=f"{label}, C = {b:.2g}")
            if r is not None:
                Dm = float(np.mean(D[ii]))
                Us = np.geomspace(Dm / max(epochs.max() * 1.5, 2), Dm / min(epochs.min() / 1.5, 0.5), 80)
                th = r["_theta"]
                eff = effective_data(np.full_like(Us, Dm), Us, math.exp(th[-1]))
                if r["one_size"]:
                    yy = np.exp(np.logaddexp(th[0], th[1] - th[2] * np.log(eff)))
                else:
                    yy = np.exp(np.logaddexp(np.logaddexp(th[0], th[1] - th[2] * np.log(N[ii][0])),
                                             th[3] - th[4] * np.log(eff)))
                ax.plot(Dm / Us, yy, color=col, lw=1, alpha=0.5 + 0.5 * j / 2)
    txt = "; ".join(f"{OBJ_STYLE.get(o, ('k', 'o', o))[2]} R*_D = {r['r_star']:.3g} "
                    f"[{r['r_star_ci'][0]:.3g}, {r['r_star_ci'][1]:.3g}]" for o, r in rep.items())
    ax.set_title(f"repeated data: {txt}", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("epochs over the unique tokens (D / U)")
    ax.set_ylabel(f"held-out {loss} NELBO (nats/token), 95% CI")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_figure(fig, out / "repeat.png")


# ----------------------------------------------------------------------------- report

def _fmt_ci(v, ci, f="{:.3g}"):
    if not np.isfinite(v):
        return "n/a"
    lo, hi = ci
    return f"{f.format(v)} [{f.format(lo)}, {f.format(hi)}]" if np.isfinite(lo) else f.format(v)


def markdown(result: dict) -> str:
    lines = [f"# Scaling fit: {result['sweep']}", "",
             f"{result['runs']} runs; loss = held-out {result['loss']} NELBO (nats/token; AR: exact NLL); "
             f"N = {result['params']} parameters; C = training FLOPs; 95% bootstrap intervals ({result['boot']} "
             f"replicates).", ""]
    if result.get("isoflop"):
        lines += ["## Approach 2 (IsoFLOP parabolas)", "",
                  "| objective | N_opt ~ C^a | D_opt ~ C^b | frontier L* ~ C^k | residual sd |", "|---|---|---|---|---|"]
        for obj, it in result["isoflop"].items():
            lines.append(f"| {obj} | {_fmt_ci(it['a'], it['a_ci'])} | {_fmt_ci(it['b'], it['b_ci'])} | "
                         f"{_fmt_ci(it['frontier_exponent'], it['frontier_exponent_ci'])} | {it['residual_sd']:.3g} |")
        lines += ["", "| objective | budget (FLOPs) | N_opt | D_opt | L* | vertex inside the size grid |",
                  "|---|---|---|---|---|---|"]
        for obj, it in result["isoflop"].items():
            for pb in it["per_budget"]:
                lines.append(f"| {obj} | {pb['budget']:.3g} | {_fmt_ci(pb['n_opt'], pb['n_opt_ci'])} | "
                             f"{_fmt_ci(pb['d_opt'], pb['d_opt_ci'])} | {_fmt_ci(pb['l_min'], pb['l_min_ci'], '{:.4f}')} "
                             f"| {'yes' if pb['inside_grid'] else 'no (extrapolated)'} |")
        lines.append("")
    if result.get("parametric"):
        lines += ["## Approach 3 (L = E + A/N^alpha + B/D^beta, Huber on log-loss)", "",
                  "| objective | E | A | alpha | B | beta | a = beta/(alpha+beta) | b = alpha/(alpha+beta) | rms log residual |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for obj, p in result["parametric"].items():
            lines.append(f"| {obj} | {_fmt_ci(p['E'], p['E_ci'])} | {_fmt_ci(p['A'], p['A_ci'])} | "
                         f"{_fmt_ci(p['alpha'], p['alpha_ci'])} | {_fmt_ci(p['B'], p['B_ci'])} | "
                         f"{_fmt_ci(p['beta'], p['beta_ci'])} | {_fmt_ci(p['a'], p['a_ci'])} | "
                         f"{_fmt_ci(p['b'], p['b_ci'])} | {p['rms_log_residual']:.3g} |")
        lines.append("")
    if result.get("multiplier"):
        m = result["multiplier"]
        lines += ["## Compute multiplier (MDM compute / AR compute at equal frontier loss)", "",
                  "| AR budget (FLOPs) | multiplier |", "|---|---|"]
        for o in m["per_ar_budget"]:
            lines.append(f"| {o['ar_flops']:.3g} | {_fmt_ci(o['multiplier'], o['ci'])} |")
        lines += ["", f"Geometric mean: {m['geomean']:.3g} (both frontiers extrapolated where needed)", "",
                  "Read at MDM's frontier points on AR's frontier (AR compute for MDM's loss):", "",
                  "| MDM budget (FLOPs) | MDM frontier loss | multiplier | loss inside AR's range |", "|---|---|---|---|"]
        for o in m.get("per_mdm_budget", []):
            lines.append(f"| {o['mdm_flops']:.3g} | {o['mdm_loss']:.4f} | {_fmt_ci(o['multiplier'], o['ci'])} | "
                         f"{'yes' if o['in_range'] else 'no (extrapolated)'} |")
        g = m.get("geomean_in_range", float("nan"))
        lines += ["", f"Geometric mean over in-range points: {g:.3g}" if math.isfinite(g) else
                  "No MDM frontier loss lies inside AR's measured range: every reading extrapolates AR's frontier.", ""]
    if result.get("multipliers"):
        lines += ["## Per noise type: compute multiplier against AR and N_opt ~ C^a", "",
                  "| objective | multiplier per AR budget (95% CI) | geometric mean | in-range geometric mean | "
                  "N_opt ~ C^a |", "|---|---|---|---|---|"]
        for o, m in result["multipliers"].items():
            per = "; ".join(f"{b['ar_flops']:.3g}: {_fmt_ci(b['multiplier'], b['ci'])}" for b in m["per_ar_budget"])
            g, gi = m.get("geomean", float("nan")), m.get("geomean_in_range", float("nan"))
            fit = result["isoflop"][o]
            a_txt = _fmt_ci(fit["a"], fit["a_ci"]) if math.isfinite(fit["a"]) else "not resolved by the grid"
            lines.append(f"| {o} | {per} | {g:.3g} | {gi:.3g} | {a_txt} |")
        lines.append("")
    if result.get("repeat"):
        lines += ["## Data-constrained (Muennighoff et al. effective data)", "",
                  "| objective | R*_D (repeat half-life, epochs) | beta | rms log residual |", "|---|---|---|---|"]
        for obj, r in result["repeat"].items():
            lines.append(f"| {obj} | {_fmt_ci(r['r_star'], r['r_star_ci'])} | {r['beta']:.3g} | "
                         f"{r['rms_log_residual']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def _public(d):
    if isinstance(d, dict):
        return {k: _public(v) for k, v in d.items() if not k.startswith("_")}
    if isinstance(d, list):
        return [_public(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


@_single_threaded
def analyse(sweep_dir, out=None, *, boot: int = 200, loss: str = "final", params: str = "nonembed",
            seed: int = 0, plots: bool = True) -> dict:
    rows = load_index(sweep_dir)
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else (sweep_dir if sweep_dir.is_dir() else sweep_dir.parent) / "scaling"
    out.mkdir(parents=True, exist_ok=True)
    by_obj: dict = {}
    for r in rows:
        by_obj.setdefault(r["objective"], []).append(r)
    constrained = any(r.get("unique_tokens") for r in rows)
    result = {"sweep": rows[0].get("sweep", sweep_dir.name), "runs": len(rows), "loss": loss, "params": params,
              "boot": boot, "figures": []}
    if constrained:
        rep = {}
        for obj, rs in by_obj.items():
            N, D, C, L, S = _xy(rs, loss, params)
            U = np.array([r["unique"] for r in rs], float)
            rep[obj] = repeat_fit(N, D, U, L, boot=boot, seed=seed)
        result["repeat"] = rep
        if plots:
            result["figures"].append(str(plot_repeat(by_obj, rep, out, loss, params)))
    else:
        iso, par = {}, {}
        for obj, rs in by_obj.items():
            N, D, C, L, S = _xy(rs, loss, params)
            iso[obj] = isoflop_fit(N, D, C, L, S, [r["budget"] for r in rs], boot=boot, seed=seed)
            if len(rs) >= 6:
                par[obj] = parametric_fit(N, D, L, boot=boot, seed=seed)
        result["isoflop"], result["parametric"] = iso, par
        if "mdm" in iso and "ar" in iso:
            result["multiplier"] = compute_multiplier(iso, {o: iso[o]["_reps"] for o in ("mdm", "ar")})
        if "ar" in iso and any(o not in ("ar", "mdm") for o in iso):
            # Noise-type comparisons (masked, hybrid, uniform, ...): every diffusion objective against AR.
            result["multipliers"] = {o: compute_multiplier(iso, {k: iso[k]["_reps"] for k in (o, "ar")}, o)
                                     for o in iso if o != "ar"}
        if plots:
            result["figures"] += [str(plot_isoflop(by_obj, iso, out, loss, params)),
                                  str(plot_frontier(by_obj, iso, result.get("multiplier"), out, loss)),
                                  str(plot_optimal(iso, out))]
    (out / "scaling.json").write_text(json.dumps(_public(result), indent=1))
    (out / "scaling.md").write_text(markdown(result))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m eval.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="a sweep directory (runs/NAME) or its index.jsonl")
    ap.add_argument("--out", default=None, help="output folder (default: SWEEP/scaling)")
    ap.add_argument("--boot", type=int, default=200, help="bootstrap replicates")
    ap.add_argument("--loss", choices=("final", "best"), default="final")
    ap.add_argument("--params", choices=("nonembed", "total"), default="nonembed")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        result = analyse(a.sweep, a.out, boot=a.boot, loss=a.loss, params=a.params, seed=a.seed)
    except (FileNotFoundError, ValueError) as e:
        ap.exit(2, f"error: {e}\n")
    print(markdown(result))
    for f in result["figures"]:
        print(f"figure: {f}")


if __name__ == "__main__":
    main()
