"""Pipeline stages: each module's `run(cfg, root)` reads declared inputs, calls the `salve`
library, writes declared outputs atomically and returns a small JSON-able summary.

`STAGES` is the single description of the DAG and of every path a stage reads or writes:
`dvc.yaml` is generated from it (`salve dvc-yaml`, checked by a test), and stages find their
files through it (`STAGES["rank"].path(root, "ranking")`), never as literals. The pipeline's
stages (`STAGE_ORDER`, what `salve run` and a plain `dvc repro` run) go to `dvc.yaml`; the
study's (`STUDY_ORDER`, what `salve study` runs: docs/METHOD.md's open questions, on the
pipeline's outputs) go to `study/dvc.yaml` (docs/PIPELINE.md, "The study"). A stage's code
dependencies are not listed here: they are derived from its module's imports (tasks/deps.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from salve.config import FinetuneConfig

# What the user points the pipeline at, as DVC dependencies: `${data.path}` is resolved by DVC
# from params.yaml (a folder, in or outside the repository); `weights` is the folder that holds
# any file `finetune.weights` may name (salve/config.py enforces that).
DATA_INPUT = "${data.path}"
WEIGHTS_INPUT = "weights"
# The quality gate's thresholds are checked by `extract` (before the SAE), so changing them
# reruns that check, not the fine-tuning.
GATE_PARAMS = ("finetune.min_val_accuracy", "finetune.min_class_accuracy")
FINETUNE_PARAMS = tuple(
    f"finetune.{f.name}" for f in fields(FinetuneConfig) if f"finetune.{f.name}" not in GATE_PARAMS
)


@dataclass(frozen=True)
class StageSpec:
    """One stage: its parameters, upstream stages, user inputs and every file it writes.

    ``files`` names the files inside the output folder by role; ``plots`` names its plot files
    (under plots/<stage>/) by role. A stage may also write files with computed names (one PNG
    per latent) inside its output folder: DVC tracks the folder.
    """

    name: str
    params: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()  # user-supplied files and folders (DVC dependencies)
    out: str = ""  # the stage's output folder; results/<name> unless set
    reads_metrics: bool = False  # depends on the upstream stages' metrics and plots files
    dvcfile: str = "dvc.yaml"  # the dvc.yaml that declares it (its lock file lies beside it)

    @property
    def out_dir(self) -> str:
        return self.out or f"results/{self.name}"

    @property
    def metrics_file(self) -> str:
        return f"metrics/{self.name}.json"

    @property
    def plot_files(self) -> list[str]:
        return [f"plots/{self.name}/{p}" for p in self.plots.values()]

    @property
    def dvc_target(self) -> str:
        """The stage as DVC names it: ``name`` in ./dvc.yaml, else ``path/dvc.yaml:name``."""
        return self.name if self.dvcfile == "dvc.yaml" else f"{self.dvcfile}:{self.name}"

    @property
    def lock_file(self) -> str:
        """The dvc.lock that records it (beside its dvc.yaml)."""
        return str(Path(self.dvcfile).with_name("dvc.lock"))

    def folder(self, root: Path) -> Path:
        return Path(root) / self.out_dir

    def path(self, root: Path, role: str) -> Path:
        """The file this stage writes for ``role`` (e.g. STAGES["fetch"].path(root, "val"))."""
        return self.folder(root) / self.files[role]

    def plot(self, root: Path, role: str) -> Path:
        return Path(root) / "plots" / self.name / self.plots[role]

    def metrics_path(self, root: Path) -> Path:
        return Path(root) / self.metrics_file

    @property
    def data_deps(self) -> list[str]:
        """Everything the stage reads except code: user inputs and upstream outputs."""
        ups = [STAGES[u].out_dir for u in self.upstream]
        if self.reads_metrics:
            ups += [STAGES[u].metrics_file for u in self.upstream]
            ups += [p for u in self.upstream for p in STAGES[u].plot_files]
        return list(self.inputs) + ups


ANALYSIS_UPSTREAM = ("fetch", "finetune", "extract", "fit_sae", "rank")

STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec(
            "fetch",
            ("data", "common.seed"),
            files={"train": "train.safetensors", "val": "val.safetensors", "meta": "meta.json"},
            inputs=(DATA_INPUT,),
        ),
        StageSpec(
            "finetune",
            (*FINETUNE_PARAMS, "common"),
            upstream=("fetch",),
            files={"model": "model.safetensors", "sidecar": "model.json"},
            plots={"epochs": "epochs.csv"},
            inputs=(WEIGHTS_INPUT,),
        ),
        StageSpec(
            "extract",
            ("extract", "common", *GATE_PARAMS),
            upstream=("fetch", "finetune"),
            files={"train": "train.safetensors", "val": "val.safetensors"},
        ),
        StageSpec(
            "fit_sae",
            ("sae", "common"),
            upstream=("extract", "finetune"),
            files={"sae": "sae.safetensors", "sidecar": "sae.json"},
            plots={"loss": "loss.csv"},
        ),
        StageSpec(
            "rank",
            ("rank",),
            upstream=("extract", "fit_sae", "fetch"),
            files={"ranking": "ranking.json", "class_means": "class_means.csv"},
        ),
        StageSpec(
            "edit",
            ("edit",),
            upstream=ANALYSIS_UPSTREAM,
            files={
                "model": "model.safetensors",
                "sidecar": "model.json",
                "latents": "latents.json",
            },
            plots={"curves": "curves.csv"},
        ),
        StageSpec(
            "alpha_crit",
            ("alpha_crit",),
            upstream=ANALYSIS_UPSTREAM,
            files={"values": "alpha_crit.safetensors"},
            plots={"samples": "samples.csv"},
        ),
        StageSpec(
            "gradfam",
            ("gradfam", "common"),
            upstream=ANALYSIS_UPSTREAM,
            files={
                "tensors": "gradfam.safetensors",
                "index": "index.json",
                "latents": "latents.json",
            },
        ),
        StageSpec(
            "evaluate",
            ("evaluate", "sae", "common", "edit.min_base_accuracy", "extract.batch_size"),
            upstream=ANALYSIS_UPSTREAM,
            files={"seeds": "seeds.json", "shifted": "shifted.safetensors"},
            plots={"methods": "methods.csv"},
        ),
        StageSpec(
            "report",
            (),
            upstream=(*ANALYSIS_UPSTREAM, "edit", "alpha_crit", "gradfam", "evaluate"),
            files={"report": "index.html", "latents": "latents.html"},
            reads_metrics=True,
            out="reports/latest",
        ),
    )
}

STUDY_DVC_YAML = "study/dvc.yaml"
COMMON_SEED = ("common.seed", "common.reproducible")
STUDY_EDIT_PARAMS = (
    "sae",
    "evaluate.projection_alpha",
    "evaluate.paper_alpha",
    "edit.min_base_accuracy",
    *COMMON_SEED,
)
# The study (flows/study.py, `salve study`): one stage per open question of docs/METHOD.md, and
# the page that shows them. Each reads the pipeline's outputs; its numbers depend on exactly the
# parameters listed (study.workers only says where they are computed).
STUDY_STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "study_adversarial",
        (
            *(
                f"study.{k}"
                for k in (
                    "attack_per_class",
                    "attack_steps",
                    "attack_bisection_steps",
                    "attack_targets",
                    "eps_max_linf",
                    "eps_max_l2",
                    "bootstrap",
                )
            ),
            *COMMON_SEED,
        ),
        upstream=("fetch", "finetune", "extract", "alpha_crit"),
        files={"record": "record.json"},
        dvcfile=STUDY_DVC_YAML,
    ),
    StageSpec(
        "study_sae_variants",
        (
            *(
                f"study.{k}"
                for k in ("seeds", "target_l0", "match_l0_fits", "aux_l1", "l1_l2_ratio")
            ),
            *STUDY_EDIT_PARAMS,
        ),
        upstream=("fetch", "finetune", "extract", "fit_sae"),
        files={"record": "record.json"},
        dvcfile=STUDY_DVC_YAML,
    ),
    StageSpec(
        "study_deeper_layer",
        ("study.deeper_layer", "study.deeper_alpha", *STUDY_EDIT_PARAMS),
        upstream=("fetch", "finetune", "extract", "fit_sae", "rank"),
        files={"record": "record.json"},
        dvcfile=STUDY_DVC_YAML,
    ),
    StageSpec(
        "study_report",
        (),
        upstream=("fetch", "study_adversarial", "study_sae_variants", "study_deeper_layer"),
        files={"page": "index.html"},
        out="reports/study",
        dvcfile=STUDY_DVC_YAML,
    ),
)
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)  # the pipeline, in DAG order
STAGES.update((s.name, s) for s in STUDY_STAGES)
STUDY_ORDER: tuple[str, ...] = tuple(s.name for s in STUDY_STAGES)
# The question each study stage answers, as flows/study.py and the study page name it.
STUDY_PARTS: dict[str, str] = {
    "adversarial": "study_adversarial",
    "sae_variants": "study_sae_variants",
    "deeper_layer": "study_deeper_layer",
}
