"""Statistics over result records (``experiments.run``'s JSONs): accuracies from the per-item hits, the
item bootstrap behind every interval in the report, and summaries of the router statistics."""
from __future__ import annotations

import numpy as np


def hits(record: dict, task: str, split: str = "test") -> np.ndarray:
    """The unit's 0/1 hit per item of ``task`` (file order), as uint8."""
    return np.frombuffer(record["eval"][split][task]["label_correct"].encode(), dtype=np.uint8) - ord("0")


def mean_acc(record: dict, tasks: list[str], split: str = "test") -> float | None:
    """Unweighted mean over ``tasks`` of label accuracy, None unless the record scored all of them."""
    found = record["eval"].get(split, {})
    if not tasks or any(t not in found for t in tasks):
        return None
    return float(np.mean([found[t]["label_acc"] for t in tasks]))


def pct(x: float | None) -> str:
    """An accuracy in [0, 1] as points with one decimal; a dash when missing."""
    return "—" if x is None else f"{100 * x:.1f}"


def item_draws(record: dict, tasks: list[str], *, reps: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """Per task, ``reps`` bootstrap resamples of its test items: indices ``[reps, n_task]``. Drawn once and
    applied to every record scored on the same items, they make the comparisons paired."""
    rng = np.random.default_rng(seed)
    return {t: rng.integers(0, len(hits(record, t)), size=(reps, len(hits(record, t)))) for t in tasks}


def boot_mean(values: dict[str, np.ndarray], draws: dict[str, np.ndarray]) -> np.ndarray:
    """The mean over tasks of ``values[task]`` (one number per item: a hit, or a difference of hits)
    averaged over each resample of ``draws``: ``[reps]``."""
    boot = np.zeros(len(next(iter(draws.values()))))
    for task, v in values.items():
        boot += v[draws[task]].mean(axis=1)
    return boot / len(values)


def boot_acc(record: dict, tasks: list[str], draws: dict[str, np.ndarray]) -> np.ndarray:
    """``record``'s mean accuracy over ``tasks`` on each resample of ``draws``: ``[reps]``, fractions."""
    return boot_mean({t: hits(record, t).astype(float) for t in tasks}, draws)


def boot_diff(a: dict, b: dict, tasks: list[str], draws: dict[str, np.ndarray]) -> np.ndarray:
    """acc(a) - acc(b) on each resample of ``draws`` (the same items for both): ``[reps]``, fractions."""
    return boot_mean({t: hits(a, t).astype(float) - hits(b, t) for t in tasks}, draws)


def interval(boot: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of a bootstrap sample."""
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def paired_bootstrap(a: dict, b: dict, tasks: list[str], *, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over tasks of acc(a) - acc(b) on the same test examples, and its 95% paired-bootstrap interval
    (examples resampled within each task), in points."""
    draws = item_draws(a, tasks, reps=reps, seed=seed)
    point = float(np.mean([(hits(a, t).astype(float) - hits(b, t)).mean() for t in tasks]))
    lo, hi = interval(boot_diff(a, b, tasks, draws))
    return 100 * point, 100 * lo, 100 * hi


def specialisation(router: dict) -> dict[str, dict[str, float]]:
    """Per task: mean load entropy over layers (nats), and the mean total-variation distance between the task's
    expert shares and the pooled shares (0 = every task routes alike; 1 = disjoint experts)."""
    pooled = router["tasks"]["all"]["layers"]
    out = {}
    for task, r in router["tasks"].items():
        if task == "all":
            continue
        tv = [0.5 * float(np.abs(np.subtract(x["share"], p["share"])).sum()) for x, p in zip(r["layers"], pooled)]
        out[task] = {"load_entropy": float(np.mean([x["load_entropy"] for x in r["layers"]])), "tv": float(np.mean(tv))}
    return out


def router_summary(router: dict) -> dict[str, float]:
    """One model's routing in four numbers (nats, except ``tv``): ``entropy``, the router's mean per-token
    entropy (lower = sharper decisions); ``load_entropy`` and ``min_load_entropy``, the balance of the pooled
    load (mean and worst layer; ln E = even); ``tv``, the mean task specialisation (``specialisation``)."""
    pooled = router["tasks"]["all"]["layers"]
    per_task = [r for task, r in router["tasks"].items() if task != "all"]
    spec = specialisation(router)
    return {"entropy": float(np.mean([x["entropy"] for r in per_task for x in r["layers"]])),
            "load_entropy": float(np.mean([x["load_entropy"] for x in pooled])),
            "min_load_entropy": float(min(x["load_entropy"] for x in pooled)),
            "tv": float(np.mean([v["tv"] for v in spec.values()]))}
