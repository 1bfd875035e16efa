"""Pipeline stages: each module's `run(cfg, root)` reads declared inputs, calls the `salve`
library, writes declared outputs atomically and returns a small JSON-able summary.

`STAGES` is the single description of the DAG: `dvc.yaml` is generated from it
(`salve dvc-yaml`) and a test checks the committed file matches. A stage's code dependencies are
not listed here: they are derived from its module's imports (tasks/deps.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
    name: str
    params: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # user-supplied files and folders (DVC dependencies)
    out: str = ""  # the stage's output folder; results/<name> unless set
    reads_metrics: bool = False  # depends on the upstream stages' metrics and plots files

    @property
    def out_dir(self) -> str:
        return self.out or f"results/{self.name}"

    @property
    def metrics_file(self) -> str:
        return f"metrics/{self.name}.json"

    @property
    def data_deps(self) -> list[str]:
        """Everything the stage reads except code: user inputs and upstream outputs."""
        ups = [STAGES[u].out_dir for u in self.upstream]
        if self.reads_metrics:
            ups += [STAGES[u].metrics_file for u in self.upstream]
            ups += [p for u in self.upstream for p in STAGES[u].plots]
        return list(self.inputs) + ups


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("fetch", ("data", "common.seed"), inputs=(DATA_INPUT,)),
        StageSpec(
            "finetune",
            (*FINETUNE_PARAMS, "common"),
            upstream=("fetch",),
            plots=("plots/finetune/epochs.csv",),
            inputs=(WEIGHTS_INPUT,),
        ),
        StageSpec("extract", ("extract", "common", *GATE_PARAMS), upstream=("fetch", "finetune")),
        StageSpec(
            "fit_sae",
            ("sae", "common"),
            upstream=("extract", "finetune"),
            plots=("plots/fit_sae/loss.csv",),
        ),
        StageSpec("rank", ("rank",), upstream=("extract", "fit_sae", "fetch")),
        StageSpec(
            "edit",
            ("edit",),
            upstream=("fetch", "finetune", "extract", "fit_sae", "rank"),
            plots=("plots/edit/curves.csv",),
        ),
        StageSpec(
            "alpha_crit",
            ("alpha_crit",),
            upstream=("fetch", "finetune", "extract", "fit_sae", "rank"),
            plots=("plots/alpha_crit/samples.csv",),
        ),
        StageSpec(
            "gradfam",
            ("gradfam", "common"),
            upstream=("fetch", "finetune", "extract", "fit_sae", "rank"),
        ),
        StageSpec(
            "report",
            (),
            upstream=(
                "fetch",
                "finetune",
                "extract",
                "fit_sae",
                "rank",
                "edit",
                "alpha_crit",
                "gradfam",
            ),
            reads_metrics=True,
            out="reports/latest",
        ),
    )
}

STAGE_ORDER: tuple[str, ...] = tuple(STAGES)
