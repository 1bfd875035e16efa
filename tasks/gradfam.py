"""gradfam: for every dominant and cross-class feature, its top-activating val images with
Grad-FAM overlays, and an activation-maximisation image per dominant feature."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from salve.config import Config
from salve.data import normalise
from salve.gradfam import gradfam_maps, top_activating, upsample_normalise
from salve.io import read_json, save_tensors, write_bytes, write_json
from salve.models import penultimate
from salve.runtime import seed_everything
from salve.visualize import activation_maximisation, image_png, overlay_grid_png
from tasks.common import load_activations, load_dataset_meta, load_split, stage_dir, write_metrics
from tasks.finetune import load_model
from tasks.fit_sae import encode_all, load_sae


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    g = cfg.gradfam
    seed_everything(cfg.common.seed, num_threads=cfg.common.num_threads)
    classes = load_dataset_meta(root)["classes"]
    ranking = read_json(stage_dir(root, "rank") / "ranking.json")
    model, sidecar = load_model(root)
    sae, _ = load_sae(root)
    norm = sidecar["normalisation"]
    mean, std = tuple(norm["mean"]), tuple(norm["std"])
    images, _ = load_split(root, "val")
    acts, labels = load_activations(root, "val")
    codes = encode_all(sae, acts)
    size = int(images.shape[-1])

    features = {d["feature"]: f"dominant: {d['name']}" for d in ranking["dominant"]}
    for c in ranking["cross_class"]:
        names = ", ".join(classes[k] for k in c["classes"])
        features.setdefault(c["feature"], f"cross-class: {names}")
    dominant = {d["feature"] for d in ranking["dominant"]}

    out = stage_dir(root, "gradfam")
    index, tensors = [], {}
    for feature, role in tqdm(features.items(), desc="gradfam", disable=not progress, leave=False):
        top = top_activating(codes, feature, g.top_k)
        x = normalise(images[top], mean, std)
        maps = upsample_normalise(
            gradfam_maps(model, sae, x, [feature], batch_size=g.batch_size, vit_tap="block_input"),
            size,
        )[:, 0]
        tensors[f"maps.{feature}"] = maps
        tensors[f"top.{feature}"] = top
        titles = [f"{classes[int(labels[i])]} z={float(codes[i, feature]):.2f}" for i in top]
        write_bytes(
            out / f"overlay_{feature}.png",
            overlay_grid_png(images[top], maps, titles, ncols=g.top_k),
        )
        entry = {
            "feature": feature,
            "role": role,
            "top_indices": top.tolist(),
            "top_classes": [classes[int(labels[i])] for i in top],
            "overlay": f"overlay_{feature}.png",
        }
        if feature in dominant and g.am_steps > 0:
            am = activation_maximisation(
                model,
                sae,
                feature,
                image_size=size,
                steps=g.am_steps,
                lr=g.am_lr,
                l2=g.am_l2,
                tv=g.am_tv,
                jitter=g.am_jitter,
                seed=cfg.common.seed,
                mean=mean,
                std=std,
            )
            tensors[f"am.{feature}"] = am
            with torch.no_grad():
                z_am = float(
                    sae.encode(
                        penultimate(
                            model, normalise((am * 255).round().to(torch.uint8)[None], mean, std)
                        )
                    )[0, feature]
                )
            write_bytes(out / f"am_{feature}.png", image_png(am, scale=max(1, 128 // size)))
            entry |= {
                "am": f"am_{feature}.png",
                "am_code": z_am,
                "top_code_mean": float(codes[top, feature].mean()),
            }
        index.append(entry)
    save_tensors(out / "gradfam.safetensors", tensors)
    write_json(out / "index.json", {"features": index, "image_size": size})
    summary = {"features": len(index), "am_images": sum("am" in e for e in index), "top_k": g.top_k}
    write_metrics(root, "gradfam", summary)
    return summary
