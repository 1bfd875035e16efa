"""Loading what upstream stages wrote: one place, each loader naming the stage to run when its
file is missing (rather than a bare `[Errno 2]`)."""

from __future__ import annotations

from pathlib import Path

import torch

from salve.io import ArtifactError, TensorRows, load_tensors, read_json
from tasks import STAGES
from tasks.records import DatasetMeta, Ranking, read_record


def require(root: Path, stage: str, role: str) -> Path:
    """The path of ``stage``'s output ``role``; missing: an error naming the stage to run."""
    path = STAGES[stage].path(root, role)
    if not path.exists():
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        raise ArtifactError(
            f"{rel} is missing: it is written by stage {stage}. Run `salve run` (or "
            f"`salve stage {stage}`) to make it."
        )
    return path


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,3,S,S] and int64 labels of the prepared train or val split."""
    t = load_tensors(require(root, "fetch", split), ("images", "labels"))
    return t["images"], t["labels"]


def open_split(root: Path, split: str) -> tuple[TensorRows, torch.Tensor]:
    """The prepared split's uint8 images [N,3,S,S] as `TensorRows` (read by row slices when
    needed: a split of any size, one batch in memory) and its int64 labels, loaded."""
    path = require(root, "fetch", split)
    return TensorRows(path, "images"), TensorRows(path, "labels")[:]


def load_dataset_meta(root: Path) -> DatasetMeta:
    return read_record(require(root, "fetch", "meta"), DatasetMeta, "fetch")


def load_activations(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input [N, M] (float32) and labels, refusing non-finite values."""
    path = require(root, "extract", split)
    t = load_tensors(path, ("acts", "labels"))
    bad = int((~torch.isfinite(t["acts"])).sum())
    if bad:  # else fit_sae would blame its learning rate for a NaN loss
        raise ArtifactError(
            f"{path}: {bad} activation values are NaN or infinite. It is corrupted: rerun "
            "extract (`salve stage extract --force`)."
        )
    return t["acts"], t["labels"]


def load_model(root: Path, stage: str = "finetune") -> tuple[torch.nn.Module, dict]:
    """The fine-tuned (or, with stage="edit", the edited) classifier in eval mode + sidecar."""
    from salve.models import load_checkpoint

    require(root, stage, "sidecar")
    return load_checkpoint(require(root, stage, "model"))


def load_sae(root: Path):
    """The fitted SAE, rebuilt from its weights and the encode rule in its sidecar."""
    from salve.sae import sae_from_tensors

    info = read_json(require(root, "fit_sae", "sidecar"))
    tensors = load_tensors(require(root, "fit_sae", "sae"), ("encoder.weight", "decoder.weight"))
    # sidecars written before the encode rule was recorded hold only kind and k
    rule = info.get("encode") or info["kind"]
    return sae_from_tensors(tensors, rule, info.get("k", 0)), info


def load_ranking(root: Path) -> Ranking:
    return read_record(require(root, "rank", "ranking"), Ranking, "rank")
