"""gradfam: for every SAE latent, its top-activating val images with Grad-FAM overlays;
the deletion AUC (saliency order vs a random order) of the dominant features and of seeded
samples of the cross-class features and of the other latents; activation-maximisation images
for the dominant features (where the report shows them).

Cost bounded by what is shown: the top images come from the cached val codes, each distinct
image's forward pass is shared by every latent that shows it (``gradfam_shared``), the deletion
test runs on a fixed number of latents (the dominant features, and ``gradfam.deletion_sample``
each of the cross-class features and of the others) and only on the top images where the
latent is on (elsewhere its curve is NaN), and the strips are composited in batches and
written without one fsync each (one sync at the end). What still grows with the width: one
strip per live latent, and the maps' forward passes, at most one per val image.

Outputs (results/gradfam/): ``latent_<l>.png`` per latent that is ever active on val (a strip
of its top images with their maps), ``overlay_<l>.png`` (the same with titles) per dominant or
cross-class feature, ``am_<l>.png`` per dominant feature, ``latents.json`` (every latent:
frequency, top images, overlay, AM, AUCs; a latent never active on val is marked ``dead``, with
no images),
``index.json`` (the dominant and cross-class features, read by the report) and
``gradfam.safetensors`` (top indices, -1 for a dead latent; maps at the layer's grid; per-image
AUCs, NaN outside the deletion test; the latents tested; AM images).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from tqdm.auto import tqdm

from salve.config import Config
from salve.data import normalise
from salve.faithfulness import deletion_latents, latent_deletion_aucs, top_images
from salve.feature_layers import images_per_pass, select_layer
from salve.feature_vis import activation_maximisation_batch
from salve.gradfam import gradfam_shared, upsample_normalise
from salve.io import save_tensors, write_bytes
from salve.models import penultimate
from salve.present.images import image_png, overlay_grid_png
from salve.present.strips import strip_pngs
from salve.runtime import seed_everything
from tasks import STAGES
from tasks.artifacts import (
    load_activations,
    load_dataset_meta,
    load_model,
    load_ranking,
    load_sae,
    open_split,
)
from tasks.common import PartTimes, write_metrics
from tasks.records import GradfamIndex, GradfamLatents, GradfamMetrics, write_record

# Latent/image pairs whose deletion curves (or strips) are computed together (bounds memory).
PAIRS_PER_CHUNK = 256
# Side of a browser strip's tiles: smaller images are enlarged by a whole factor up to it,
# larger ones reduced to it (thumbnails, six to a row: at 224 px a third of the pixels to
# composite and encode for every live latent). The report's figures keep the full size.
STRIP_TILE = 128


def _finite_mean(values: torch.Tensor) -> float | None:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    g, seed, parts = cfg.gradfam, cfg.common.seed, PartTimes()
    seed_everything(seed, num_threads=cfg.common.num_threads)
    classes = load_dataset_meta(root)["classes"]
    ranking = load_ranking(root)
    model, sidecar = load_model(root)
    sae, _ = load_sae(root)
    norm = sidecar["normalisation"]
    mean, std = tuple(norm["mean"]), tuple(norm["std"])
    images, _ = open_split(root, "val")  # the top rows are read
    acts, labels = load_activations(root, "val")
    codes = sae.encode_batched(acts)
    size = int(images.shape[-1])
    layer = select_layer(model, size, g.layer)
    per_pass = images_per_pass(model, size, g.batch_size, g.memory_mb)  # bounds the peak
    roles = _roles(ranking, classes)
    spec = STAGES["gradfam"]
    out = spec.folder(root)

    live = (codes != 0).any(dim=0)  # a dead latent has no top images
    top = top_images(codes, g.top_k)
    top[~live] = -1
    transform = lambda batch: normalise(batch, mean, std)  # noqa: E731 - one line, used twice
    parts.lap("load")
    maps_lkhw = _top_maps(model, sae, images, codes, top, live, layer, per_pass, transform)
    parts.lap("maps")
    dominant = [d["feature"] for d in ranking["dominant"]]
    cross = [c["feature"] for c in ranking["cross_class"]]
    tested = deletion_latents(dominant, cross, live, g.deletion_sample, seed)
    auc_lk, auc_random_lk = latent_deletion_aucs(
        model,
        sae,
        images,
        codes,
        top,
        maps_lkhw,
        tested,
        transform=transform,
        steps=g.deletion_steps,
        seed=seed,
        batch_size=g.batch_size,
        pairs_per_chunk=PAIRS_PER_CHUNK,
        progress=progress,
    )
    parts.lap("deletion_test")
    # Only where it is shown: the report's card of each dominant feature. At 224 px one feature's
    # AM costs about 300 forward passes' worth of optimisation steps.
    am_feats = sorted({d["feature"] for d in ranking["dominant"]}) if g.am_steps > 0 else []
    am_images, am_codes = _activation_maximisation(
        cfg, model, sae, am_feats, size, mean, std, per_pass
    )
    parts.lap("activation_maximisation")
    _write_images(
        out, images, labels, codes, top, maps_lkhw, roles, classes, am_images, am_feats, progress
    )
    parts.lap("images")

    header = {"image_size": size, "layer": layer.name, "map_grid": list(layer.grid)}
    latents = _latent_records(codes, labels, classes, top, am_codes, auc_lk, auc_random_lk)
    write_record(spec.path(root, "latents"), GradfamLatents, header | {"latents": latents})
    index = _index_records(roles, latents, codes, top)
    write_record(spec.path(root, "index"), GradfamIndex, header | {"features": index})
    tensors = {
        "top": top,
        "maps": maps_lkhw,
        "deletion_auc": auc_lk,
        "deletion_auc_random": auc_random_lk,
        "deletion_latents": torch.tensor(tested, dtype=torch.long),
        "am_features": torch.tensor(am_feats, dtype=torch.long),
    }
    if am_feats:
        tensors["am"] = am_images
    save_tensors(spec.path(root, "tensors"), tensors)
    summary = _summary(latents, index, tested, am_feats, g.top_k, layer)
    write_metrics(root, "gradfam", GradfamMetrics, summary, run=parts.record())
    return summary


def _roles(ranking: dict, classes: list[str]) -> dict[int, str]:
    """The dominant and cross-class features, each with what it is shown as."""
    roles = {d["feature"]: f"dominant: {d['name']}" for d in ranking["dominant"]}
    for c in ranking["cross_class"]:
        names = ", ".join(classes[k] for k in c["classes"])
        roles.setdefault(c["feature"], f"cross-class: {names}")
    return roles


def _top_maps(model, sae, images, codes, top, live, layer, batch_size, transform) -> torch.Tensor:
    """Maps of every live latent's top images at the layer's grid, [L, k, h, w]: one forward
    pass per distinct image."""
    n_latents, k = top.shape
    alive = torch.nonzero(live).flatten()
    maps_lkhw = torch.zeros(n_latents, k, *layer.grid)
    rows, feats = top[alive].flatten(), alive.repeat_interleave(k)
    maps = gradfam_shared(
        model,
        sae,
        images,
        rows,
        feats,
        layer=layer,
        batch_size=batch_size,
        transform=transform,
        on_hint=codes[rows, feats] != 0,  # groups images by backward rows, nothing else
    )
    maps_lkhw[alive] = maps.view(len(alive), k, *layer.grid).float()
    return maps_lkhw


def _write_images(
    out, images, labels, codes, top, maps_lkhw, roles, classes, am_images, am_feats, progress
) -> None:
    """Strips of every live latent, titled figures of the roles, AM images; images an earlier
    run (another SAE width) left are removed; one filesystem sync at the end."""
    size, k = int(images.shape[-1]), int(top.shape[1])
    zoom = max(1, STRIP_TILE // size)
    side = min(size, STRIP_TILE)  # before the enlargement by zoom
    alive = torch.nonzero(top[:, 0] >= 0).flatten()
    written: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, data: bytes) -> None:
        write_bytes(out / name, data, fsync=False)
        written.add(name)

    per_chunk = max(1, PAIRS_PER_CHUNK // k)
    chunks = range(0, len(alive), per_chunk)
    for c0 in tqdm(chunks, desc="gradfam strips", disable=not progress, leave=False):
        lats = alive[c0 : c0 + per_chunk]
        saliency = upsample_normalise(maps_lkhw[lats].flatten(0, 1)[:, None], side)[:, 0]
        tiles = images[top[lats].flatten()]
        if side < size:
            tiles = F.interpolate(tiles.float(), size=(side, side), mode="area")
            tiles = tiles.round().clamp(0, 255).to(torch.uint8)
        pngs = strip_pngs(
            tiles.view(len(lats), k, *tiles.shape[1:]),
            saliency.view(len(lats), k, side, side),
            scale=zoom,
        )
        for j, (lat, png) in enumerate(zip(lats.tolist(), pngs, strict=True)):
            put(f"latent_{lat}.png", png)
            if lat in roles:  # the report's figure: with class and code over each image
                rows = top[lat]
                titles = [f"{classes[int(labels[i])]} z={float(codes[i, lat]):.2f}" for i in rows]
                maps = maps_lkhw[lat][:, None]
                sal = (
                    upsample_normalise(maps, size)[:, 0]
                    if side < size
                    else saliency[j * k : (j + 1) * k]
                )
                put(
                    f"overlay_{lat}.png",
                    overlay_grid_png(images[rows], sal, titles, ncols=k, cell_inches=1.5),
                )
    for f, am in zip(am_feats, am_images, strict=True):
        put(f"am_{f}.png", image_png(am, scale=zoom))
    for p in out.glob("*.png"):
        if p.name not in written and re.fullmatch(r"(latent|overlay|am)_\d+\.png", p.name):
            p.unlink()
    if hasattr(os, "sync"):
        os.sync()


def _latent_records(codes, labels, classes, top, am_codes, auc_lk, auc_random_lk) -> list[dict]:
    """latents.json's entry per latent."""
    latents = []
    frequency = (codes != 0).double().mean(dim=0)
    for lat in range(codes.shape[1]):
        has_am, dead = lat in am_codes, bool(top[lat, 0] < 0)
        shown = [] if dead else top[lat].tolist()
        latents.append(
            {
                "latent": lat,
                "frequency": float(frequency[lat]),
                "dead": dead,
                "top": [
                    {"index": i, "class": classes[int(labels[i])], "code": float(codes[i, lat])}
                    for i in shown
                ],
                "overlay": None if dead else f"latent_{lat}.png",
                "am": f"am_{lat}.png" if has_am else None,
                "am_code": am_codes[lat] if has_am else None,
                "deletion_auc": _finite_mean(auc_lk[lat]),
                "deletion_auc_random": _finite_mean(auc_random_lk[lat]),
            }
        )
    return latents


def _index_records(roles: dict[int, str], latents: list[dict], codes, top) -> list[dict]:
    """index.json's entry per dominant or cross-class feature, with its AM ratio."""
    index = []
    for f, role in roles.items():
        entry = latents[f]
        shown = top[f][top[f] >= 0]  # none for a latent never active on val
        record = {
            "feature": f,
            "role": role,
            "top_indices": shown.tolist(),
            "top_classes": [t["class"] for t in entry["top"]],
            "overlay": f"overlay_{f}.png" if len(shown) else None,
            "top_code_mean": float(codes[shown, f].mean()) if len(shown) else None,
            "deletion_auc": entry["deletion_auc"],
            "deletion_auc_random": entry["deletion_auc_random"],
        }
        if entry["am"]:  # the AM image's code against the feature's top val images
            record |= {"am": entry["am"], "am_code": entry["am_code"]}
            record["am_ratio"] = _am_ratio(entry["am_code"], record["top_code_mean"])
        index.append(record)
    return index


def _summary(latents, index, tested, am_feats, top_k, layer) -> dict:
    """metrics/gradfam.json."""
    per_latent = [(latents[t]["deletion_auc"], latents[t]["deletion_auc_random"]) for t in tested]
    scored = [(a, r) for a, r in per_latent if a is not None and r is not None]
    return {
        "features": len(index),
        "latents": len(latents),
        "dead_latents": sum(e["dead"] for e in latents),
        "am_images": len(am_feats),
        "am_features": len(am_feats),
        "am_activating": _am_activating(index),
        "top_k": top_k,
        "layer": layer.name,
        "map_grid": list(layer.grid),
        "deletion_latents": tested,
        "deletion_auc": sum(a for a, _ in scored) / len(scored) if scored else None,
        "deletion_auc_random": sum(r for _, r in scored) / len(scored) if scored else None,
        "maps_no_better_than_random": sum(a >= r for a, r in scored),
        "latents_without_auc": len(tested) - len(scored),
    }


def _activation_maximisation(
    cfg: Config, model, sae, feats: list[int], size: int, mean: tuple, std: tuple, per_pass: int
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
        batch_size=per_pass,
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
