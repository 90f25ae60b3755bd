"""The learning curve at equal budget (issue 18), from the curve units' JSONs: accuracy per method against
optimizer steps, the paired gap between two methods at each length and its trend in log-steps (does it close,
hold or widen; where would it reach zero), per-task curves, the router against steps, what each unit cost and
what the units not yet run would cost. ``section`` and ``plan`` write the report's parts and its figures.

Every interval is a 95% item bootstrap over the test items (the same resamples for every unit, so differences
and trends are paired); a length run with several seeds counts as the mean of its seeds.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from experiments.data import TEST_SIZE, VAL_SIZE
from experiments.run import (CURVE, CURVE_BASE, CURVE_GROUPS, CURVE_SEEDS, METHODS, Runner, Unit, config_path,
                             schedule_overrides, select, setting_tasks)
from experiments.stats import boot_acc, boot_diff, interval, item_draws, mean_acc, pct, router_summary

NAMES = {"lora": "LoRA", "dora": "DoRA", "mixlora": "MixLoRA", "mixdora": "MixDoRA"}
PAIRS = (("mixlora", "lora"), ("mixdora", "dora"), ("dora", "lora"), ("mixdora", "mixlora"))
REPS = 2000
SESSION_HOURS = 4  # the session length the plan's example splits the work into
GROUP_TEXT = {"curve-core": "the base model, LoRA and MixLoRA at every length",
              "curve-seeds": f"LoRA and MixLoRA at the longest length, seeds {', '.join(map(str, CURVE_SEEDS))}",
              "curve-dora": "DoRA and MixDoRA at every length",
              "curve-dora-seeds": "DoRA and MixDoRA at the longest length, the same seeds"}
Curve = dict[str, dict[str, dict[int, dict]]]  # method -> setting -> training seed -> record


def curve_records(res: dict[str, dict]) -> Curve:
    """The finished, untagged curve units, ``{method: {setting: {seed: record}}}``."""
    out: Curve = {}
    for r in res.values():
        if r["setting"] in CURVE and not r.get("tag"):
            out.setdefault(r["method"], {}).setdefault(r["setting"], {})[r["resolved_config"]["train"]["seed"]] = r
    return out


@dataclasses.dataclass
class Point:
    """One method (or one difference of two) at one length: ``value`` and its interval in points, the value
    of each seed, and the bootstrap sample behind the interval (``[reps]``, points)."""

    setting: str
    steps: int
    seeds: tuple[int, ...]
    value: float
    lo: float
    hi: float
    per_seed: tuple[float, ...]
    boot: np.ndarray = dataclasses.field(repr=False)


def _point(setting: str, records: list[dict], values: list[float], boots: list[np.ndarray], seeds) -> Point:
    boot = 100 * np.mean(boots, axis=0)
    lo, hi = interval(boot)
    return Point(setting, records[0]["train"]["steps"], tuple(seeds), 100 * float(np.mean(values)), lo, hi,
                 tuple(100 * v for v in values), boot)


def _lengths(by_setting: dict[str, Any]) -> list[str]:
    return sorted(by_setting, key=CURVE.__getitem__)


def accuracy_curve(curve: Curve, method: str, tasks: list[str], draws: dict[str, np.ndarray]) -> list[Point]:
    """``method``'s mean test accuracy over ``tasks`` at each length it ran."""
    out = []
    for setting in _lengths(curve.get(method, {})):
        by_seed = curve[method][setting]
        recs = [by_seed[s] for s in sorted(by_seed)]
        out.append(_point(setting, recs, [mean_acc(r, tasks) for r in recs], [boot_acc(r, tasks, draws) for r in recs],
                          sorted(by_seed)))
    return out


def gap_curve(curve: Curve, a: str, b: str, tasks: list[str], draws: dict[str, np.ndarray]) -> list[Point]:
    """acc(a) - acc(b) on the same items at each length both ran, over the seeds both ran."""
    out = []
    for setting in _lengths({s: 0 for s in curve.get(a, {}) if s in curve.get(b, {})}):
        seeds = sorted(set(curve[a][setting]) & set(curve[b][setting]))
        if not seeds:
            continue
        pairs = [(curve[a][setting][s], curve[b][setting][s]) for s in seeds]
        values = [mean_acc(ra, tasks) - mean_acc(rb, tasks) for ra, rb in pairs]
        out.append(_point(setting, [ra for ra, _ in pairs], values, [boot_diff(ra, rb, tasks, draws) for ra, rb in pairs],
                          seeds))
    return out


@dataclasses.dataclass
class Trend:
    """A straight line through a gap's points in log10(steps), fitted on every bootstrap resample.

    ``slope`` (points per tenfold steps) and its interval; ``verdict``: closes | reverses | widens | holds |
    opens (no gap at the shortest length, a trend away from zero) | short (fewer than two lengths);
    ``crossover``: the steps where the line reaches zero when the gap closes, its interval (``inf``: the
    resample's trend does not close) and ``closing_share``, the share of resamples whose trend closes it."""

    points: list[Point]
    slope: float | None = None
    slope_lo: float | None = None
    slope_hi: float | None = None
    verdict: str = "short"
    crossover: float | None = None
    cross_lo: float | None = None
    cross_hi: float | None = None
    closing_share: float | None = None


def _significant(p: Point) -> bool:
    return p.lo > 0 or p.hi < 0


def fit_trend(points: list[Point]) -> Trend:
    if len(points) < 2:
        return Trend(points)
    x = np.log10([p.steps for p in points])
    xc = x - x.mean()
    boots = np.stack([p.boot for p in points], axis=1)  # [reps, lengths]
    values = np.array([p.value for p in points])
    slopes = (boots - boots.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    intercepts = boots.mean(axis=1) - slopes * x.mean()
    slope = float((values - values.mean()) @ xc / (xc @ xc))
    intercept = float(values.mean() - slope * x.mean())
    lo, hi = interval(slopes)
    first, last = points[0], points[-1]
    sign = np.sign(first.value) or 1.0  # the side the gap starts on
    trend = Trend(points, slope, lo, hi)
    closing = slopes * sign < 0
    trend.closing_share = float(closing.mean())
    if lo <= 0 <= hi:
        trend.verdict = "holds"
    elif not _significant(first):
        trend.verdict = "opens"
    elif slope * sign > 0:
        trend.verdict = "widens"
    elif _significant(last) and np.sign(last.value) != sign:
        trend.verdict = "reverses"
    else:
        trend.verdict = "closes"
    if trend.verdict == "closes":
        with np.errstate(divide="ignore", over="ignore"):
            cross = np.where(closing, 10.0 ** (-intercepts / np.where(closing, slopes, 1.0)), np.inf)
        trend.crossover = 10.0 ** (-intercept / slope)
        trend.cross_lo, trend.cross_hi = (float(v) for v in np.percentile(cross, [2.5, 97.5], method="inverted_cdf"))
    return trend


def _steps(n: float) -> str:
    return "never" if not math.isfinite(n) else f"{n:,.0f}" if n < 1e6 else f"{n:.1e}"


def seed_noise(gaps: list[Point]) -> dict[str, float] | None:
    """At the length with most seeds (at least 2): the seed-to-seed spread (sd) of the gap, the item
    bootstrap's standard error of one seed's gap, and how many seeds."""
    many = [p for p in gaps if len(p.seeds) > 1]
    if not many:
        return None
    p = max(many, key=lambda q: len(q.seeds))
    # The seeds share the test items, so the item noise of their mean is about that of one seed.
    return {"steps": p.steps, "seeds": len(p.seeds), "sd": float(np.std(p.per_seed, ddof=1)),
            "item_se": (p.hi - p.lo) / 3.92}


def trend_text(a: str, b: str, trend: Trend, *, no_repeat_steps: int | None, tasks: list[str]) -> str:
    """The verdict on ``a - b`` in words, every number taken from ``trend``."""
    name = f"{NAMES[a]} − {NAMES[b]}"
    pts = trend.points
    if not pts:
        return f"**{name}**: not yet run."
    at = "; ".join(f"{p.value:+.1f} [{p.lo:+.1f}, {p.hi:+.1f}] at {p.steps} steps"
                   + (f" ({len(p.seeds)} seeds)" if len(p.seeds) > 1 else "") for p in pts)
    text = f"**{name}** (test, mean over the {len(tasks)} tasks, points): {at}. "
    if trend.verdict == "short":
        return text + (f"One length has run of {len(CURVE)}; a trend needs at least two.")
    slope = f"{trend.slope:+.1f} points per tenfold steps [{trend.slope_lo:+.1f}, {trend.slope_hi:+.1f}]"
    behind, ahead = (NAMES[a], NAMES[b]) if pts[0].value < 0 else (NAMES[b], NAMES[a])
    if trend.verdict == "holds":
        return text + (f"The gap **holds**: its trend ({slope}) cannot be told from no change between "
                       f"{pts[0].steps} and {pts[-1].steps} steps, so no crossover can be placed "
                       f"({100 * trend.closing_share:.0f}% of the resamples have a trend that closes it).")
    if trend.verdict == "widens":
        return text + f"The gap **widens** ({slope}): {behind} falls further behind with training; no crossover ahead."
    if trend.verdict == "opens":
        return text + (f"No clear gap at {pts[0].steps} steps, but a trend of {slope}: "
                       f"{NAMES[a] if trend.slope > 0 else NAMES[b]} pulls ahead with training.")
    if trend.verdict == "reverses":
        flip = next(i for i in range(1, len(pts)) if np.sign(pts[i].value) == -np.sign(pts[0].value))
        return text + (f"The gap **reverses** ({slope}): {behind} is behind at {pts[0].steps} steps and ahead at "
                       f"{pts[-1].steps}; the crossover lies between {pts[flip - 1].steps} and {pts[flip].steps} "
                       "steps (observed, not extrapolated).")
    longest = pts[-1].steps
    factor = trend.crossover / longest
    doubts = [f"the line goes through {len(pts)} lengths"
              + (" only, so nothing checks its shape" if len(pts) < 3 else f", {len(pts) - 2} more than a line needs"),
              "learning curves tend to flatten, which a straight line in log-steps ignores"]
    if factor > 1:
        doubts.append(f"it is extrapolated {factor:.1f}x past the longest run")
    if not math.isfinite(trend.cross_hi):
        doubts.append(f"{100 * (1 - trend.closing_share):.0f}% of the resamples do not close the gap at all")
    if no_repeat_steps is not None and trend.crossover > no_repeat_steps:
        doubts.append(f"past {no_repeat_steps:,} steps the smallest training pool runs out and examples would "
                      "repeat, which no run here tested")
    trust = "some" if len(pts) >= 3 and math.isfinite(trend.cross_hi) and factor <= 3 else "little"
    return text + (f"The gap **closes** ({slope}): {behind} gains on {ahead}. If the trend held, the gap would "
                   f"reach zero at about {_steps(trend.crossover)} steps (95% interval {_steps(trend.cross_lo)} to "
                   f"{_steps(trend.cross_hi)}). Trust in that figure: {trust}; " + "; ".join(doubts) + ".")


def seed_text(gaps: list[Point], a: str, b: str) -> str:
    noise = seed_noise(gaps)
    if noise is None:
        return (f"Seed noise is not measured yet (one seed per length for {NAMES[a]} and {NAMES[b]}; "
                "`--only curve-seeds` adds two more at the longest length): the intervals cover the sampling of "
                "the test items only, not the training's randomness (data order, initialisation, dropout).")
    ratio = noise["sd"] / noise["item_se"] if noise["item_se"] else float("inf")
    verdict = ("comparable to" if 0.5 <= ratio <= 2 else "larger than" if ratio > 2 else "smaller than")
    return (f"Seed noise at {noise['steps']} steps ({noise['seeds']} seeds): the {NAMES[a]} − {NAMES[b]} gap varies "
            f"by {noise['sd']:.1f} points (sd) from seed to seed, {verdict} the item bootstrap's standard error of "
            f"{noise['item_se']:.1f}; counting the seed as noise too would widen a one-seed interval "
            f"{math.sqrt(1 + ratio ** 2):.1f}x.")


def no_repeat_steps(setting: str) -> int | None:
    """The most steps one pass over the smallest training pool allows (samples per task = steps x batch /
    tasks), from the prepared data; None when the data are absent."""
    from loramix.runconfig import load_run_config

    cfg = load_run_config(str(config_path(setting)), [])
    paths = [Path(d.path) for d in cfg.data.datasets]
    if not all(p.exists() for p in paths):
        return None
    smallest = min(sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip()) for p in paths)
    batch = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
    return smallest * len(paths) // batch


# ---- figures --------------------------------------------------------------------------------------------------
def _axes(n: int, width: float = 4.6, cols: int | None = None):
    """A figure of ``n`` panels in rows of ``cols`` (default: one row), and the panels as a flat list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = cols or n
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _steps_axis(ax, steps: list[int]) -> None:
    """A log axis of optimizer steps labelled at the lengths that ran."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted(set(steps)), [str(s) for s in sorted(set(steps))])
    ax.set_xlabel("optimizer steps")


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _errorbars(ax, points: list[Point], label: str) -> str:
    """``points`` with their intervals (and each seed as a grey dot); returns the line's colour."""
    bars = ax.errorbar([p.steps for p in points], [p.value for p in points], marker="o", capsize=3, label=label,
                       yerr=[[p.value - p.lo for p in points], [p.hi - p.value for p in points]])
    for p in points:
        if len(p.per_seed) > 1:
            ax.scatter([p.steps] * len(p.per_seed), p.per_seed, s=10, color="grey", zorder=3)
    return bars.lines[0].get_color()


def plot_curve(acc: dict[str, list[Point]], trends: dict[tuple[str, str], Trend], path: Path) -> None:
    """Left: mean test accuracy per method against steps; right: each gap with its fitted trend, extended
    to its crossover (at most 10x past the longest run)."""
    plt, fig, (left, right) = _axes(2, 5.2)
    for method, points in acc.items():
        _errorbars(left, points, NAMES[method])
    left.set_ylabel("test accuracy, mean over tasks (%)")
    ticks = [p.steps for points in acc.values() for p in points]
    for (a, b), trend in trends.items():
        colour = _errorbars(right, trend.points, f"{NAMES[a]} − {NAMES[b]}")
        if trend.slope is not None:
            first, last = trend.points[0].steps, trend.points[-1].steps
            xs = np.geomspace(first, max(last, min(10 * last, trend.crossover or last)), 50)
            x = np.log10([p.steps for p in trend.points])
            y = np.mean([p.value for p in trend.points]) + trend.slope * (np.log10(xs) - x.mean())
            right.plot(xs, y, linestyle="--", color=colour, linewidth=1)
            ticks.append(round(xs[-1]))
    right.axhline(0, color="black", linewidth=0.8)
    right.set_ylabel("difference (points); dashed: trend")
    for ax in (left, right):
        _steps_axis(ax, ticks)
        ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_tasks(per_task: dict[str, dict[str, list[Point]]], path: Path) -> None:
    """One panel per task: its test accuracy per method against steps."""
    plt, fig, axes = _axes(len(per_task), 3.6, cols=3)
    for ax, (task, by_method) in zip(axes, per_task.items()):
        for method, points in by_method.items():
            _errorbars(ax, points, NAMES[method])
        ax.set_title(task)
        ax.set_ylabel("test accuracy (%)")
        _steps_axis(ax, [p.steps for points in by_method.values() for p in points])
    axes[0].legend(fontsize=7)
    _save(plt, fig, path)


def plot_router(router: dict[str, list[tuple[int, dict[str, float]]]], max_entropy: float, path: Path) -> None:
    """Router entropy, load entropy and task specialisation against steps, per mixture method."""
    plt, fig, axes = _axes(3, 4.0)
    keys = (("entropy", "router entropy per token (nats)"), ("load_entropy", "load entropy, pooled (nats)"),
            ("tv", "task specialisation (TV)"))
    for ax, (key, label) in zip(axes, keys):
        for method, rows in router.items():
            ax.plot([s for s, _ in rows], [v[key] for _, v in rows], marker="o", label=NAMES[method])
        if key != "tv":
            ax.axhline(max_entropy, color="grey", linestyle=":", linewidth=0.8)
        ax.set_ylabel(label)
        _steps_axis(ax, [s for rows in router.values() for s, _ in rows])
    axes[0].legend(fontsize=8)
    _save(plt, fig, path)


# ---- the report's parts ---------------------------------------------------------------------------------------
def _setup_text(res: dict[str, dict]) -> str:
    from loramix.runconfig import load_run_config

    recipe = config_path(next(iter(CURVE)))
    cfg = load_run_config(str(recipe), [])
    t, a = cfg.train, cfg.adapter
    per_task = []
    for setting, steps in CURVE.items():
        sets = schedule_overrides(Unit(setting, "lora"), str(recipe), [])
        samples = [s.split("=")[1] for s in sets if ".samples=" in s] or [str(cfg.data.datasets[0].samples)]
        per_task.append(f"{steps} steps ({samples[0]} examples per task)")
    ranks = sorted({f"{NAMES[r['method']]} r={r['params']['rank']}" for r in res.values()
                    if r["setting"] in CURVE and r.get("params") and r["method"] in ("lora", "dora")})
    return (f"One adapter trained on a mixture of {len(cfg.data.datasets)} classification tasks "
            f"({', '.join(setting_tasks(next(iter(CURVE))))}; the commonsense tasks, which every adapter of the "
            f"grid answered with one constant choice, are left out) at {len(CURVE)} lengths: "
            f"{', '.join(per_task)}, each one pass over its own seeded examples "
            f"(`experiments/configs/{recipe.name}` at that share of its steps and examples). Every length and "
            f"method: {t.micro_batch_size * t.gradient_accumulation_steps} examples per step, AdamW lr "
            f"{t.learning_rate}, {t.lr_scheduler} schedule with {100 * t.warmup_ratio:g}% warmup, sequences cut "
            f"at {cfg.data.cutoff_len} tokens, seed {t.seed} (the longest length also with seeds "
            f"{', '.join(map(str, CURVE_SEEDS))}); MixLoRA/MixDoRA {a['num_experts']} experts, top-{a['top_k']}, "
            f"r={a['r']}; LoRA/DoRA at the rank of the same budget"
            + (f" ({', '.join(ranks)})" if ranks else "") + f". Scored on {TEST_SIZE} test items per task "
            f"(intervals) and {VAL_SIZE} validation items (for choices).")


def _status(res: dict[str, dict]) -> str:
    parts = []
    for group, text in GROUP_TEXT.items():
        units = select([group])
        done = sum(u.name in res for u in units)
        parts.append(f"{text}: {done} of {len(units)}")
    return "Units run: " + "; ".join(parts) + "."


def _router_rows(curve: Curve) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """Per mixture method and length (seed-mean): ``router_summary``'s numbers against the trained steps."""
    out = {}
    for method in ("mixlora", "mixdora"):
        rows = []
        for setting in _lengths(curve.get(method, {})):
            recs = [r for r in curve[method][setting].values() if "router" in r]
            if recs:
                sums = [router_summary(r["router"]) for r in recs]
                rows.append((recs[0]["train"]["steps"], {k: float(np.mean([s[k] for s in sums])) for k in sums[0]}))
        if rows:
            out[method] = rows
    return out


def _router_text(rows: dict[str, list[tuple[int, dict[str, float]]]]) -> list[str]:
    """Per mixture method, how its routing moved from the shortest to the longest length, in words."""
    out = []
    for method, r in rows.items():
        if len(r) < 2:
            continue
        (s0, v0), (s1, v1) = r[0], r[-1]

        def move(key: str, tol: float) -> str:
            d = v1[key] - v0[key]
            return f"{'rises' if d > tol else 'falls' if d < -tol else 'stays'} ({v0[key]:.3f} → {v1[key]:.3f})"

        sharper = v0["entropy"] - v1["entropy"]
        out.append(f"{NAMES[method]}, {s0} → {s1} steps: the per-token router entropy {move('entropy', 0.02)}, "
                   f"i.e. routing {'sharpens' if sharper > 0.02 else 'softens' if sharper < -0.02 else 'does not sharpen'}"
                   f"; the pooled load entropy {move('load_entropy', 0.02)} (worst layer "
                   f"{v1['min_load_entropy']:.3f}); task specialisation (TV) {move('tv', 0.01)}.")
    return out


def _cost_table(res: dict[str, dict]) -> list[str]:
    lines = ["| unit | steps | training (min) | s/step | scoring (min) | CPU (min) | threads | sessions | "
             "load avg start / end | device |", "|---|---|---|---|---|---|---|---|---|---|"]
    for u in select(list(CURVE_GROUPS)):
        r = res.get(u.name)
        if r is None:
            continue
        c, m = r.get("cost", {}), r["machine"]
        minutes = lambda s: "—" if s is None else f"{s / 60:.1f}"  # noqa: E731
        lines.append(f"| {u.name} | {r.get('train', {}).get('steps', '—')} | {minutes(c.get('train_s'))} | "
                     f"{c.get('s_per_step') or '—'} | {minutes(c.get('score_s'))} | {minutes(c.get('cpu_s'))} | "
                     f"{c.get('threads', m['threads'])} | {r.get('train', {}).get('sessions', '—')} | "
                     f"{m['loadavg_start']} / {m['loadavg_end']} | {m.get('gpu') or 'CPU'} |")
    return lines if len(lines) > 2 else ["_No curve unit has run yet._"]


def _cell(p: Point, sign: str = "") -> str:
    """``value [lo, hi]`` in points, with the number of seeds when more than one."""
    seeds = f" ({len(p.seeds)} seeds)" if len(p.seeds) > 1 else ""
    return f"{p.value:{sign}.1f} [{p.lo:{sign}.1f}, {p.hi:{sign}.1f}]{seeds}"


def section(res: dict[str, dict], figures: Path, rel: Callable[[Path], str]) -> list[str]:
    """The report's learning-curve section (figures written under ``figures``)."""
    curve = curve_records(res)
    tasks = setting_tasks(next(iter(CURVE)))
    lines = ["## Learning curve at equal budget: does the gap close with more training?", "", _setup_text(res), "",
             _status(res), ""]
    records = [r for by_setting in curve.values() for by_seed in by_setting.values() for r in by_seed.values()]
    if not records:
        return lines + ["_No curve unit has run yet: there are no numbers for this section. The plan in "
                        "\"Reproduce\" says what to run and what it costs._", ""]
    draws = item_draws(records[0], tasks, reps=REPS)
    acc = {m: accuracy_curve(curve, m, tasks, draws) for m in METHODS if m in curve}
    gaps = {(a, b): gap_curve(curve, a, b, tasks, draws) for a, b in PAIRS}
    trends = {pair: fit_trend(points) for pair, points in gaps.items() if points}
    limit = no_repeat_steps(next(iter(CURVE)))
    lines += ["### The verdict", "", "_Generated from the result JSONs; every number below is computed, none "
              "written by hand._", ""]
    for a, b in PAIRS:
        lines += [trend_text(a, b, trends.get((a, b), Trend([])), no_repeat_steps=limit, tasks=tasks), ""]
    lines += [seed_text(gaps[("mixlora", "lora")], "mixlora", "lora"), ""]

    plot_curve(acc, trends, figures / "curve_accuracy.png")
    lines += ["### Accuracy against steps", "", f"![learning curve]({rel(figures / 'curve_accuracy.png')})", "",
              "| method | " + " | ".join(f"{s}" for s in CURVE) + " |", "|---|" + "---|" * len(CURVE)]
    for method in METHODS:
        by = {p.setting: p for p in acc.get(method, [])}
        lines.append(f"| {method} | " + " | ".join(_cell(by[s]) if s in by else "not yet run" for s in CURVE) + " |")
    lines += ["", "Test accuracy (%), mean over the tasks, 95% item-bootstrap interval; seed-mean where a length "
              "has several seeds (grey dots in the figure). Validation means (the split every choice is made on):", "",
              "| method | " + " | ".join(CURVE) + " |", "|---|" + "---|" * len(CURVE)]
    for method in METHODS:
        by = curve.get(method, {})
        lines.append(f"| {method} | " + " | ".join(
            pct(float(np.mean([mean_acc(r, tasks, 'val') for r in by[s].values()]))) if s in by else "not yet run"
            for s in CURVE) + " |")

    per_task = {t: {m: accuracy_curve(curve, m, [t], draws) for m in METHODS if m in curve} for t in tasks}
    plot_tasks(per_task, figures / "curve_tasks.png")
    lines += ["", "### Per task", "", f"![per-task curves]({rel(figures / 'curve_tasks.png')})", "",
              "Test accuracy (%) per task and length:", "",
              "| task | method | " + " | ".join(CURVE) + " |", "|---|---|" + "---|" * len(CURVE)]
    for task in tasks:
        for method, points in per_task[task].items():
            by = {p.setting: p for p in points}
            lines.append(f"| {task} | {method} | "
                         + " | ".join(f"{by[s].value:.1f}" if s in by else "—" for s in CURVE) + " |")
    lines += ["", "MixLoRA − LoRA per task (points, 95% paired interval):", "",
              "| task | " + " | ".join(CURVE) + " |", "|---|" + "---|" * len(CURVE)]
    for task in tasks:
        by = {p.setting: p for p in gap_curve(curve, "mixlora", "lora", [task], draws)}
        lines.append(f"| {task} | " + " | ".join(_cell(by[s], "+") if s in by else "not yet run" for s in CURVE) + " |")

    rows = _router_rows(curve)
    lines += ["", "### Router load and specialisation against steps", ""]
    if rows:
        e = next(r for r in records if "router" in r)["router"]
        plot_router(rows, e["max_entropy"], figures / "curve_router.png")
        lines += [f"![router against steps]({rel(figures / 'curve_router.png')})", "",
                  f"On the first validation items of each task (`loramix inspect`'s statistics, no interval). "
                  f"Router entropy: the mean entropy of the router's softmax per token (lower: sharper choices); load "
                  f"entropy: of the pooled expert shares, mean over layers (ln {e['num_experts']} = "
                  f"{e['max_entropy']:.3f} is an even load); TV: the mean distance between a task's expert shares "
                  "and the pooled ones (0: every task routes alike).", "",
                  "| method | steps | router entropy | load entropy | worst layer | TV |", "|---|---|---|---|---|---|"]
        for method, r in rows.items():
            lines += [f"| {method} | {s} | " + " | ".join(f"{v[k]:.3f}" for k in ("entropy", "load_entropy",
                                                                                 "min_load_entropy", "tv")) + " |"
                      for s, v in r]
        lines += ["", *_router_text(rows)]
    else:
        lines.append("_No MixLoRA/MixDoRA curve unit has run yet._")
    lines += ["", "### What each unit cost", "", *_cost_table(res), ""]
    return lines


# ---- the plan -------------------------------------------------------------------------------------------------
def step_costs(res: dict[str, dict], probes: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per probed method, what a free core would take: ``step`` (seconds per optimizer step: the probe's time x
    its CPU share), ``step_grid`` (the probe's tokens per step at the throughput the grid's multitask unit of
    the same method reached with one thread on a quiet machine, when it ran), ``item`` (seconds per scored
    item) and ``load`` (loading the model once)."""
    out = {}
    for p in probes.values():
        grid = res.get(f"multitask/{p['method']}", {}).get("train", {}).get("tokens_per_s")
        out[p["method"]] = {"step": p["s_per_step"] * p["train_cpu_share"],
                            "step_grid": p["tokens_per_step"] / grid if grid else None,
                            "item": p["score_cpu_share"] / p["items_per_s"], "load": p["load_s"] * p["score_cpu_share"]}
    return out


def estimate_s(unit: Unit, costs: dict[str, dict[str, float]]) -> tuple[float, float] | None:
    """The seconds ``unit`` would take on one free core, low and high (the two step estimates of
    ``step_costs``; the base model scores at LoRA's rate, an upper bound); None without a probe."""
    c = costs.get(unit.method if unit.method != "none" else "lora")
    if c is None:
        return None
    tasks = len(setting_tasks(unit.setting))
    items = tasks * (TEST_SIZE + VAL_SIZE) + (Runner.router_examples * tasks if unit.method.startswith("mix") else 0)
    score = items * c["item"] + 2 * c["load"]
    if unit.method == "none":
        return score, score
    steps = [unit.steps * c[k] for k in ("step", "step_grid") if c[k] is not None]
    return score + min(steps), score + max(steps)


def plan(res: dict[str, dict], probes: dict[str, dict], jobs: int = 2) -> list[str]:
    """The schedule for the curve units not yet run: CPU-hours per group and when each group would be done
    with ``jobs`` units at a time on free cores, from the probes' measurements."""
    if not probes:
        return ["No cost probe has been recorded yet, so there is no estimate: `make curve-probe` measures one "
                "(a few optimizer steps and some scoring per method)."]
    costs = step_costs(res, probes)
    lines = ["Measured by `python -m experiments.run probe` (`make curve-probe`: a few optimizer steps and some "
             "scoring per method, one torch thread, on this machine while others used it):", "",
             "| probe | s/step at that load | CPU share | ≈ s/step, free core | ≈ s/step from the grid's tokens/s | "
             "tokens/step | scored items/s | CPU share | load avg start / end | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in probes.values():
        c = costs[p["method"]]
        grid = f"{c['step_grid']:.1f}" if c["step_grid"] is not None else "— (no grid unit)"
        lines.append(f"| {p['unit']} | {p['s_per_step']} | {p['train_cpu_share']:.2f} | {c['step']:.1f} | {grid} | "
                     f"{p['tokens_per_step']:.0f} | {p['items_per_s']} | {p['score_cpu_share']:.2f} | "
                     f"{p['machine']['loadavg_start']} / {p['machine']['loadavg_end']} | {p['measured']} |")
    lines += ["", "The CPU share is the process's CPU time over its wall time: how much of a core the busy machine "
              "left the probe. Its times x its share estimate a free core (contention may slow the work itself "
              "too); the other estimate divides the unit's tokens per step by the training throughput of the "
              "grid's `multitask` unit of the same method (one thread each, two units on two quiet cores; its "
              "longer prompts padded less). The plan takes the two as a range; on a machine as loaded as the "
              "probe's, divide by the share.", "",
              f"| group (`--only NAME`) | units to run | CPU-hours | done after (wall hours, {jobs} at a time) |",
              "|---|---|---|---|"]
    lanes, unknown = {"low": [0.0] * jobs, "high": [0.0] * jobs}, []
    for group, text in GROUP_TEXT.items():
        todo = [u for u in select([group]) if u.name not in res]
        est = {u.name: estimate_s(u, costs) for u in todo}
        missing = [name for name, e in est.items() if e is None]
        unknown += missing
        known = [e for e in est.values() if e is not None]
        for e in known:
            for i, key in enumerate(lanes):
                lanes[key][lanes[key].index(min(lanes[key]))] += e[i]
        hours = "–".join(f"{sum(e[i] for e in known) / 3600:.1f}" for i in range(2))
        done = "–".join(f"{max(lanes[key]) / 3600:.1f}" for key in lanes)
        lines.append(f"| `{group}`: {text} | 0 (done) | 0 | — |" if not todo else
                     f"| `{group}`: {text} | {len(todo)} | no probe | — |" if not known else
                     f"| `{group}`: {text} | {len(todo)} | {hours}" + (f" + {len(missing)} unprobed" if missing else "")
                     + f" | {done} |")
    if unknown:
        lines += ["", f"No probe for {', '.join(unknown)}: their hours are left out above."]
    low, high = (max(lane) / 3600 for lane in lanes.values())
    if high > 0:
        sessions = sorted({math.ceil(low / SESSION_HOURS), math.ceil(high / SESSION_HOURS)})
        lines += ["", f"All of it: {low:.1f}–{high:.1f} wall hours of {jobs} free cores, e.g. "
                  f"{'–'.join(map(str, sessions))} sessions of {SESSION_HOURS} hours (the last column says in which "
                  "one each group is done)."]
    every = _save_steps()
    per_ckpt = ", ".join(f"{NAMES[m]} {every * c['step'] / 60:.0f}" for m, c in costs.items())
    lines += ["", f"Every unit keeps a checkpoint every {every} steps (minutes of a free core: {per_ckpt}), so a "
              "session can stop anywhere and loses at most that: run the same command in the next session, and "
              "finished units are skipped, interrupted ones resume. Take the groups in the order above: the "
              "verdict means something after `curve-core`, `curve-seeds` measures the seed noise, the DoRA "
              "groups add the other pair."]
    return lines


def _save_steps() -> int:
    from loramix.runconfig import load_run_config

    return load_run_config(str(config_path(CURVE_BASE)), []).train.save_steps
