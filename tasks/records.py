"""One typed record per stage output that another stage (or the report) reads.

Writer and reader share the record: `write_record` refuses to write a dict whose keys differ
from its record, and `read_record` refuses a file that lacks a required key, naming the stage
to rerun. Renaming a key in one stage therefore fails loudly in that stage's own run (and in the
tests), instead of silently blanking part of the report. Nested entries are typed for readers
and checkers; the runtime check covers each record's own keys.
"""

from pathlib import Path
from typing import Any, NotRequired, TypedDict, TypeVar

from salve.io import ArtifactError, read_json, write_json

# -- fetch --------------------------------------------------------------------------------------


class DatasetMeta(TypedDict):
    classes: list[str]
    info: dict[str, Any]


class FetchMetrics(TypedDict):
    source: str
    num_classes: int
    train_samples: int
    val_samples: int
    image_size: int
    # val images identical to a train image once decoded; always written, optional so that
    # a fetch.json from before it was counted (restored from DVC's cache) still reads
    val_copies_of_train: NotRequired[int]
    # folder sources: what the scan skipped or relabelled
    skipped_hidden: NotRequired[int]
    nested_images: NotRequired[int]
    non_image_files: NotRequired[int]
    images_outside_classes: NotRequired[int]
    data_notes: NotRequired[str]


# -- finetune -----------------------------------------------------------------------------------


class FinetuneMetrics(TypedDict):
    arch: str
    val_accuracy: float
    best_epoch: int
    epochs_run: int
    epoch_budget: int
    last_val_accuracy: float
    stopped_early: bool
    train_accuracy: float
    train_loss: float
    min_class_val_accuracy: float
    val_class_accuracy: dict[str, float]
    device: str


class ExtractMetrics(TypedDict):
    train_samples: int
    val_samples: int
    dim: int
    train_mean_norm: float
    val_mean_norm: float


# -- fit_sae ------------------------------------------------------------------------------------

_QUALITY = (
    "fvu",
    "explained_variance",
    "l0",
    "dead_fraction",
    "n_samples",
    "accuracy_original",
    "splice_accuracy",
    "splice_agreement",
)
FitSaeMetrics = TypedDict(  # noqa: UP013 - keys built from the quality metrics' names
    "FitSaeMetrics",
    {f"{split}_{k}": float for split in ("train", "val") for k in _QUALITY} | {"final_loss": float},
)


# -- rank ---------------------------------------------------------------------------------------


# `class` is a keyword: the functional form
DominantEntry = TypedDict(  # noqa: UP013
    "DominantEntry", {"class": int, "name": str, "feature": int, "class_mean": float}
)


class CrossClassFeature(TypedDict):
    feature: int
    classes: list[int]
    class_means: list[float]
    ratio: float


class Ranking(TypedDict):
    classes: list[str]
    dominant: list[DominantEntry]
    top: dict[str, list[int]]
    cross_class: list[CrossClassFeature]
    rule: dict[str, float]


class RankMetrics(TypedDict):
    distinct_dominant_features: int
    cross_class_features: int
    num_classes: int


# -- edit ---------------------------------------------------------------------------------------


class ClassEdit(TypedDict):
    feature: int
    target_acc_base: float
    target_acc_full_suppression: float
    off_target_mean_change: float
    off_target_max_abs_change: float
    score: float
    raises_target: bool


class EditMetrics(TypedDict):
    classes_evaluated: list[str]
    classes_left_out: list[dict[str, Any]]
    classes_below_10pct: int
    classes_selective: int
    edits_raising_target: int
    mean_score: float
    mean_abs_off_target_change: float
    per_class: dict[str, ClassEdit]
    cross_class: list[dict[str, Any]]
    checkpoint_edit: dict[str, Any]
    alpha_grid: dict[str, Any]
    # The other control on the same grid (steering beside a head edit, the projection edit
    # beside steering): mode, per_class and the counts above. Always written, optional so that
    # an edit.json from before it (restored from DVC's cache) still reads.
    companion: NotRequired[dict[str, Any]]


class LatentEffect(TypedDict):
    latent: int
    base_accuracy: list[float]
    class_change: list[float]
    companion_class_change: NotRequired[list[float]]  # by EditLatents.companion_mode


class EditLatents(TypedDict):
    mode: str
    alpha: float
    classes: list[str]
    latents: list[LatentEffect]
    companion_mode: NotRequired[str]  # "steer" beside a head edit, "projection" beside steer


# -- alpha_crit ---------------------------------------------------------------------------------


class AlphaCritMetrics(TypedDict):
    units: str
    empirical_grid: dict[str, Any]
    per_class: dict[str, dict[str, dict[str, float]]]
    median_exact: float | None
    fraction_all_terms_nonnegative: float
    linear_le_exact_when_nonnegative: float | None
    linear_le_exact_overall: float | None
    fraction_single_root: float
    fraction_multiple_roots: float
    exact_vs_brentq_max_abs_diff_single_root: float | None
    real_model_checked: int
    real_model_agree: int


# -- gradfam ------------------------------------------------------------------------------------


class GradfamFeature(TypedDict):
    feature: int
    role: str
    top_indices: list[int]
    top_classes: list[str]
    overlay: str | None
    top_code_mean: float | None
    deletion_auc: float | None
    deletion_auc_random: float | None
    # with an AM image only: its file, the code of its 8-bit image, and that code over
    # top_code_mean (None where that mean is not positive); am_ratio is optional so that an
    # index.json from before it (restored from DVC's cache) still reads
    am: NotRequired[str]
    am_code: NotRequired[float]
    am_ratio: NotRequired[float | None]


class GradfamIndex(TypedDict):
    image_size: int
    layer: str
    map_grid: list[int]
    features: list[GradfamFeature]


class GradfamLatents(TypedDict):
    image_size: int
    layer: str
    map_grid: list[int]
    latents: list[dict[str, Any]]


class GradfamMetrics(TypedDict):
    features: int
    latents: int
    am_images: int
    top_k: int
    layer: str
    map_grid: list[int]
    deletion_auc: float | None  # the mean over deletion_latents (per-latent means)
    deletion_auc_random: float | None
    maps_no_better_than_random: int  # of deletion_latents
    latents_without_auc: int  # of deletion_latents: none of its top images has its code on
    # the roles and gradfam.deletion_sample others; latents never active on val; optional as
    # above (a gradfam.json from before them, restored from DVC's cache, still reads)
    deletion_latents: NotRequired[list[int]]
    dead_latents: NotRequired[int]
    # the AM features (dominant and cross-class) and how many of their AM images have a code
    # above the mean code of the feature's top val images; optional as above
    am_features: NotRequired[int]
    am_activating: NotRequired[int]


# -- evaluate -----------------------------------------------------------------------------------


class Interval(TypedDict):
    mean: float
    ci95: list[float]
    n: int


class EvaluateMetrics(TypedDict):
    methods: dict[str, dict[str, Interval]]  # method -> metric -> mean and 95 % interval
    seeds: int
    stability: dict[str, Any]
    classes_evaluated: list[str]
    classes_left_out: list[str]
    cross_class: list[dict[str, Any]]
    settings: dict[str, Any]


class ReportMetrics(TypedDict):
    figures: int
    images: int
    sections: int
    classes: int
    latents: int
    latents_missing_sources: int


R = TypeVar("R")


def check_record(obj: dict, record: type[R], where: str) -> R:
    """``obj`` with exactly ``record``'s keys (the optional ones may be absent), else an error
    naming the missing and unexpected keys."""
    required = set(record.__required_keys__)
    allowed = required | set(record.__optional_keys__)
    missing, unexpected = sorted(required - set(obj)), sorted(set(obj) - allowed)
    if missing or unexpected:
        raise ArtifactError(
            f"{where}: does not match the {record.__name__} record (missing {missing}, "
            f"unexpected {unexpected})."
        )
    return obj  # type: ignore[return-value]


def write_record(path: Path, record: type[R], obj: R) -> None:
    """Write a stage output after checking it against its record (a writer bug fails here)."""
    check_record(obj, record, f"{path} (being written)")  # type: ignore[arg-type]
    write_json(path, obj)


def read_record(path: Path, record: type[R], stage: str) -> R:
    """Read another stage's output; a file from another version names the stage to rerun."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a JSON object; rerun stage {stage}.")
    try:
        return check_record(obj, record, str(path))
    except ArtifactError as exc:
        raise ArtifactError(
            f"{exc} It was written by another version of stage {stage}: rerun it "
            f"(`salve stage {stage} --force`)."
        ) from None
