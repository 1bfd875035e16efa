"""Edit evaluation: SALVE's suppression edits against baselines, with standard metrics
(docs/METHOD.md).

The methods themselves (the edited head and the representation it reads) are registered in
:mod:`salve.methods`. This package measures them, in float64 on cached activations (the exact
head input): no backbone, no file I/O.

- :mod:`~salve.evaluate.seed`: every method x metric for one SAE seed (:func:`evaluate_seed`);
- :mod:`~salve.evaluate.metrics`: efficacy, flip rate, specificity, probe recovery;
- :mod:`~salve.evaluate.intervals`: means with 95 % intervals over seeds;
- :mod:`~salve.evaluate.stability`: decoder columns matched across seeds (salve.matching);
- :mod:`~salve.evaluate.shifts`: held-out image styles for the generalisation metric;
- :mod:`~salve.evaluate.stage`: the evaluate stage's analysis (fits, seeds, its metrics).
"""

from salve.evaluate.intervals import mean_ci95, summarise_methods
from salve.evaluate.metrics import (
    METRICS,
    cross_class_accuracy_change,
    per_class_accuracy,
    prediction_metrics,
    probe_recovery,
)
from salve.evaluate.seed import SEED_FREE_REPRESENTATIONS, evaluate_seed, seed_free_probes
from salve.evaluate.shifts import SHIFTS, ShiftedRows, shift_images
from salve.evaluate.stability import feature_stability

__all__ = [
    "METRICS",
    "SEED_FREE_REPRESENTATIONS",
    "SHIFTS",
    "ShiftedRows",
    "cross_class_accuracy_change",
    "evaluate_seed",
    "feature_stability",
    "mean_ci95",
    "per_class_accuracy",
    "prediction_metrics",
    "probe_recovery",
    "seed_free_probes",
    "shift_images",
    "summarise_methods",
]
