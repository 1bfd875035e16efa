"""gradfam: for every SAE latent, its top-activating val images with Grad-FAM overlays and their
deletion AUC (saliency order vs a random order); activation-maximisation images for the dominant
and cross-class features.

Outputs (results/gradfam/): ``latent_<l>.png`` per latent (a strip of its top images with their
maps), ``overlay_<l>.png`` (the same with titles) and ``am_<l>.png`` per dominant or cross-class
feature, ``latents.json`` (every latent: frequency, top images, overlay, AM, AUCs),
``index.json`` (the dominant and cross-class features, read by the report) and
``gradfam.safetensors`` (top indices, maps at the layer's grid, per-image AUCs, AM images).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from salve.config import Config
from salve.data import normalise
from salve.gradfam import (
    deletion_test,
    gradfam_pairs,
    select_layer,
    top_activating,
    upsample_normalise,
)
from salve.io import save_tensors, write_bytes
from salve.models import penultimate
from salve.runtime import seed_everything
from salve.visualize import (
    activation_maximisation_batch,
    image_png,
    overlay_grid_png,
    overlay_strip_png,
)
from tasks import STAGES
from tasks.artifacts import (
    load_activations,
    load_dataset_meta,
    load_model,
    load_ranking,
    load_sae,
    open_split,
)
from tasks.common import write_metrics
from tasks.records import GradfamIndex, GradfamLatents, GradfamMetrics, write_record

# Latent/image pairs whose maps and deletion curves are computed together (bounds memory).
PAIRS_PER_CHUNK = 256


def _finite_mean(values: torch.Tensor) -> float | None:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    g = cfg.gradfam
    seed = cfg.common.seed
    seed_everything(seed, num_threads=cfg.common.num_threads)
    classes = load_dataset_meta(root)["classes"]
    ranking = load_ranking(root)
    model, sidecar = load_model(root)
    sae, _ = load_sae(root)
    norm = sidecar["normalisation"]
    mean, std = tuple(norm["mean"]), tuple(norm["std"])
    images, _ = open_split(root, "val")  # each latent's top rows are read
    acts, labels = load_activations(root, "val")
    codes = sae.encode_batched(acts)
    size = int(images.shape[-1])
    n_latents = int(codes.shape[1])
    layer = select_layer(model, size, g.layer)

    roles = {d["feature"]: f"dominant: {d['name']}" for d in ranking["dominant"]}
    for c in ranking["cross_class"]:
        names = ", ".join(classes[k] for k in c["classes"])
        roles.setdefault(c["feature"], f"cross-class: {names}")

    spec = STAGES["gradfam"]
    out = spec.folder(root)
    top = torch.stack([top_activating(codes, lat, g.top_k) for lat in range(n_latents)])  # [L, k]
    k = int(top.shape[1])
    maps_lkhw = torch.zeros(n_latents, k, *layer.grid)
    auc_lk = torch.full((n_latents, k), math.nan, dtype=torch.float64)
    auc_random_lk = torch.full_like(auc_lk, math.nan)
    per_chunk = max(1, PAIRS_PER_CHUNK // k)
    zoom = max(1, 128 // size)
    starts = range(0, n_latents, per_chunk)
    for l0 in tqdm(starts, desc="gradfam", disable=not progress, leave=False):
        lats = torch.arange(l0, min(l0 + per_chunk, n_latents))
        idx = top[lats].flatten()
        feats = lats.repeat_interleave(k)
        x = normalise(images[idx], mean, std)
        grid_maps = gradfam_pairs(model, sae, x, feats, layer=layer, batch_size=g.batch_size)
        maps_lkhw[lats] = grid_maps.reshape(len(lats), k, *layer.grid).float().cpu()
        saliency = upsample_normalise(grid_maps[:, None].float(), size)[:, 0]
        faith = deletion_test(
            model,
            sae,
            x,
            feats,
            saliency,
            steps=g.deletion_steps,
            seed=seed * 1_000_003 + l0,
            batch_size=g.batch_size,
        )
        auc_lk[lats] = faith.auc.view(len(lats), k)
        auc_random_lk[lats] = faith.auc_random.view(len(lats), k)
        for j, lat in enumerate(lats.tolist()):
            rows, sal = top[lat], saliency[j * k : (j + 1) * k].cpu()
            write_bytes(out / f"latent_{lat}.png", overlay_strip_png(images[rows], sal, scale=zoom))
            if lat in roles:  # the report's figure: with class and code over each image
                titles = [f"{classes[int(labels[i])]} z={float(codes[i, lat]):.2f}" for i in rows]
                figure = overlay_grid_png(images[rows], sal, titles, ncols=k, cell_inches=1.5)
                write_bytes(out / f"overlay_{lat}.png", figure)

    am_feats = sorted(roles) if g.am_steps > 0 else []
    am_images, am_codes = _activation_maximisation(cfg, model, sae, am_feats, size, mean, std)
    for f, am in zip(am_feats, am_images, strict=True):
        write_bytes(out / f"am_{f}.png", image_png(am, scale=zoom))

    latents = []
    for lat in range(n_latents):
        has_am = lat in am_codes
        latents.append(
            {
                "latent": lat,
                "frequency": float((codes[:, lat] != 0).double().mean()),
                "top": [
                    {
                        "index": int(i),
                        "class": classes[int(labels[i])],
                        "code": float(codes[i, lat]),
                    }
                    for i in top[lat]
                ],
                "overlay": f"latent_{lat}.png",
                "am": f"am_{lat}.png" if has_am else None,
                "am_code": am_codes[lat] if has_am else None,
                "deletion_auc": _finite_mean(auc_lk[lat]),
                "deletion_auc_random": _finite_mean(auc_random_lk[lat]),
            }
        )
    header = {"image_size": size, "layer": layer.name, "map_grid": list(layer.grid)}
    write_record(spec.path(root, "latents"), GradfamLatents, header | {"latents": latents})

    index = []
    for f, role in roles.items():
        entry = latents[f]
        index.append(
            {
                "feature": f,
                "role": role,
                "top_indices": top[f].tolist(),
                "top_classes": [t["class"] for t in entry["top"]],
                "overlay": f"overlay_{f}.png",
                "top_code_mean": float(codes[top[f], f].mean()),
                "deletion_auc": entry["deletion_auc"],
                "deletion_auc_random": entry["deletion_auc_random"],
            }
            | ({"am": entry["am"], "am_code": entry["am_code"]} if entry["am"] else {})
        )
    for e in index:  # the AM image's code against the feature's top val images
        if "am_code" in e:
            e["am_ratio"] = _am_ratio(e["am_code"], e["top_code_mean"])
    write_record(spec.path(root, "index"), GradfamIndex, header | {"features": index})

    tensors = {
        "top": top,
        "maps": maps_lkhw,
        "deletion_auc": auc_lk,
        "deletion_auc_random": auc_random_lk,
        "am_features": torch.tensor(am_feats, dtype=torch.long),
    }
    if am_feats:
        tensors["am"] = am_images
    save_tensors(spec.path(root, "tensors"), tensors)

    per_latent = [(e["deletion_auc"], e["deletion_auc_random"]) for e in latents]
    scored = [(a, r) for a, r in per_latent if a is not None and r is not None]
    summary = {
        "features": len(index),
        "latents": n_latents,
        "am_images": len(am_feats),
        "am_features": len(am_feats),
        "am_activating": _am_activating(index),
        "top_k": g.top_k,
        "layer": layer.name,
        "map_grid": list(layer.grid),
        "deletion_auc": sum(a for a, _ in scored) / len(scored) if scored else None,
        "deletion_auc_random": sum(r for _, r in scored) / len(scored) if scored else None,
        "maps_no_better_than_random": sum(a >= r for a, r in scored),
        "latents_without_auc": n_latents - len(scored),
    }
    write_metrics(root, "gradfam", GradfamMetrics, summary)
    return summary


def _activation_maximisation(
    cfg: Config, model, sae, feats: list[int], size: int, mean: tuple, std: tuple
) -> tuple[torch.Tensor, dict[int, float]]:
    """AM images [F, 3, S, S] (one batched optimisation) and each one's code after 8-bit
    quantisation (what the PNG shows)."""
    g = cfg.gradfam
    if not feats:
        return torch.empty(0, 3, size, size), {}
    images = activation_maximisation_batch(
        model,
        sae,
        feats,
        image_size=size,
        steps=g.am_steps,
        lr=g.am_lr,
        l2=g.am_l2,
        tv=g.am_tv,
        jitter=g.am_jitter,
        restarts=g.am_restarts,
        seed=cfg.common.seed,
        mean=mean,
        std=std,
        batch_size=g.batch_size,
    )
    with torch.no_grad():
        quantised = normalise((images * 255).round().to(torch.uint8), mean, std)
        codes = sae.encode(penultimate(model.eval(), quantised))
    return images, {f: float(codes[i, f]) for i, f in enumerate(feats)}


def _am_ratio(am_code: float, top_code_mean: float | None) -> float | None:
    """``am_code / top_code_mean``: above 1, the AM image drives its feature harder than its top
    val images do on average. None where that mean is not positive (no scale to compare with)."""
    if top_code_mean is None or top_code_mean <= 0:
        return None
    return am_code / top_code_mean


def _am_activating(index: list[dict]) -> int:
    """How many features' AM images have a code above the mean code of their top val images."""
    return sum(
        e["am_code"] > e["top_code_mean"]
        for e in index
        if "am_code" in e and e["top_code_mean"] is not None
    )
