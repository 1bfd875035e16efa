"""Seeds: a mean with its 95 % interval per method and metric."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import stats

from salve.methods import F64


def mean_ci95(values: Sequence[float] | np.ndarray | torch.Tensor) -> dict:
    """Mean and two-sided 95 % Student-t interval over seeds, ``mean +- t_{0.975, n-1} s/sqrt(n)``
    (``s`` the sample standard deviation). NaNs are ignored; ``n`` counts the rest. One value
    gives a zero-width interval (no spread is measurable); none gives nan everywhere."""
    arr = np.asarray(torch.as_tensor(values, dtype=F64).reshape(-1).numpy(), dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    n = int(arr.size)
    if n == 0:
        return {"mean": math.nan, "ci95": [math.nan, math.nan], "n": 0}
    mean = float(arr.mean())
    if n == 1:
        return {"mean": mean, "ci95": [mean, mean], "n": 1}
    half = float(stats.t.ppf(0.975, n - 1) * arr.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def summarise_methods(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """``{method: {metric: mean_ci95 over seeds}}`` from one ``{method: {metric: value}}`` per
    seed (e.g. ``evaluate_seed(...)["methods"]``); a metric a seed lacks counts as nan."""
    methods = list(dict.fromkeys(name for seed in per_seed for name in seed))
    out = {}
    for name in methods:
        metrics = list(dict.fromkeys(key for seed in per_seed for key in seed.get(name, {})))
        out[name] = {
            key: mean_ci95([seed.get(name, {}).get(key, math.nan) for seed in per_seed])
            for key in metrics
        }
    return out
