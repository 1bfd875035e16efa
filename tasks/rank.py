"""rank: class-mean codes, dominant feature per class, cross-class features (JSON + CSV)."""

from __future__ import annotations

from pathlib import Path

from salve.config import Config
from salve.io import write_csv
from salve.ranking import class_mean_codes, cross_class_features, dominant_features, top_features
from tasks import STAGES
from tasks.artifacts import load_activations, load_dataset_meta, load_sae
from tasks.common import write_metrics
from tasks.records import Ranking, RankMetrics, write_record


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    r = cfg.rank
    classes = load_dataset_meta(root)["classes"]
    sae, _ = load_sae(root)
    acts, labels = load_activations(root, "train")
    codes = sae.encode_batched(acts)
    mu = class_mean_codes(codes, labels, len(classes))
    dominant = dominant_features(mu).tolist()
    top = top_features(mu, r.top_n).tolist()
    # Relative to the code scale: near-silent latents (class means of 0.04 where the largest is
    # 10) are not "shared" by any class.
    min_class_mean = r.min_mean_fraction * float(mu.abs().max())
    cross = cross_class_features(mu, r.cross_class_fraction, min_class_mean)
    spec = STAGES["rank"]
    ranking: Ranking = {
        "classes": classes,
        "dominant": [
            {
                "class": k,
                "name": classes[k],
                "feature": dominant[k],
                "class_mean": float(mu[k, dominant[k]]),
            }
            for k in range(len(classes))
        ],
        "top": {classes[k]: top[k] for k in range(len(classes))},
        "cross_class": cross,
        "rule": {
            "cross_class_fraction": r.cross_class_fraction,
            "min_mean_fraction": r.min_mean_fraction,
            "min_class_mean": min_class_mean,
        },
    }
    write_record(spec.path(root, "ranking"), Ranking, ranking)
    write_csv(
        spec.path(root, "class_means"),
        ["class"] + [f"f{j}" for j in range(mu.shape[1])],
        ([classes[k]] + [f"{v:.6g}" for v in mu[k].tolist()] for k in range(len(classes))),
    )
    distinct = len(set(dominant))
    summary = {
        "distinct_dominant_features": distinct,
        "cross_class_features": len(cross),
        "num_classes": len(classes),
    }
    write_metrics(root, "rank", RankMetrics, summary)
    return summary
