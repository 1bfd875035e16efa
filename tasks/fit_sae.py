"""fit_sae: fit the sparse autoencoder on train activations; quality metrics on val."""

from __future__ import annotations

from pathlib import Path

from salve.config import Config
from salve.io import save_tensors, write_json
from salve.models import head_of
from salve.runtime import resolve_device, seed_everything
from salve.sae import fit_sae, quality_metrics, sae_tensors
from tasks import STAGES
from tasks.artifacts import load_activations, load_model
from tasks.common import run_metadata, write_metrics, write_plot
from tasks.records import FitSaeMetrics


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    s = cfg.sae
    device = resolve_device(cfg.common.device)
    seed_everything(cfg.common.seed, num_threads=cfg.common.num_threads)
    train_acts, train_labels = load_activations(root, "train")
    val_acts, val_labels = load_activations(root, "val")
    sae, history = fit_sae(train_acts, s, seed=cfg.common.seed, device=device, progress=progress)
    model, _ = load_model(root)
    head = head_of(model)
    metrics = {
        split: quality_metrics(sae, acts, head=head, labels_n=labels)
        for split, acts, labels in (
            ("train", train_acts, train_labels),
            ("val", val_acts, val_labels),
        )
    }
    spec = STAGES["fit_sae"]
    save_tensors(spec.path(root, "sae"), sae_tensors(sae), metadata={"kind": s.kind})
    write_json(
        spec.path(root, "sidecar"),
        {
            "format": "salve-sae",
            "kind": s.kind,
            "k": s.k,
            "d_in": int(train_acts.shape[1]),
            "d_latent": s.width,
            "decoder_columns_normalised": s.normalise_decoder,
            "hook_point": "head input (exact)",
            "encode": sae.describe(),
        }
        | run_metadata(root, cfg, device, ("sae", "common")),
    )
    write_plot(root, "fit_sae", "loss", history)
    summary = {f"{split}_{k}": v for split, m in metrics.items() for k, v in m.items()}
    summary["final_loss"] = history[-1]["loss"]
    write_metrics(root, "fit_sae", FitSaeMetrics, summary)
    return {
        k: summary[k]
        for k in (
            "val_fvu",
            "val_l0",
            "val_dead_fraction",
            "val_splice_accuracy",
            "val_splice_agreement",
        )
    }
