"""Pipeline stages: each module's `run(cfg, root)` reads declared inputs, calls the `salve`
library, writes declared outputs atomically and returns a small JSON-able summary.

`STAGES` is the single description of the DAG: `dvc.yaml` is generated from it
(`salve dvc-yaml`) and a test checks the committed file matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageSpec:
    name: str
    params: tuple[str, ...]
    code: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    extra_deps: tuple[str, ...] = field(default=())
    out: str = ""  # the stage's output folder; results/<name> unless set
    reads_metrics: bool = False  # depends on the upstream stages' metrics and plots files

    @property
    def out_dir(self) -> str:
        return self.out or f"results/{self.name}"

    @property
    def metrics_file(self) -> str:
        return f"metrics/{self.name}.json"

    @property
    def deps(self) -> list[str]:
        ups = [STAGES[u].out_dir for u in self.upstream]
        if self.reads_metrics:
            ups += [STAGES[u].metrics_file for u in self.upstream]
            ups += [p for u in self.upstream for p in STAGES[u].plots]
        return (
            ups
            + list(self.extra_deps)
            + [f"tasks/{self.name}.py", "tasks/common.py"]
            + [f"salve/{c}.py" for c in self.code]
        )


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("fetch", ("data", "common.seed"), ("data", "download", "io")),
        StageSpec(
            "finetune",
            ("finetune", "common"),
            ("train", "models", "runtime", "tv"),
            upstream=("fetch",),
            plots=("plots/finetune/epochs.csv",),
        ),
        StageSpec(
            "extract",
            ("extract", "common"),
            ("activations", "models", "runtime"),
            upstream=("fetch", "finetune"),
        ),
        StageSpec(
            "fit_sae",
            ("sae", "common"),
            ("sae", "runtime"),
            upstream=("extract", "finetune"),
            plots=("plots/fit_sae/loss.csv",),
        ),
        StageSpec("rank", ("rank",), ("ranking", "sae"), upstream=("extract", "fit_sae", "fetch")),
        StageSpec(
            "edit",
            ("edit",),
            ("editing", "models"),
            upstream=("fetch", "finetune", "extract", "fit_sae", "rank"),
            plots=("plots/edit/curves.csv",),
        ),
        StageSpec(
            "alpha_crit",
            ("alpha_crit",),
            ("alpha_crit", "editing", "models"),
            upstream=("fetch", "finetune", "extract", "fit_sae", "rank"),
            plots=("plots/alpha_crit/samples.csv",),
        ),
        StageSpec(
            "gradfam",
            ("gradfam", "common"),
            ("gradfam", "visualize", "models"),
            upstream=("fetch", "finetune", "extract", "fit_sae", "rank"),
        ),
        StageSpec(
            "report",
            (),
            ("report",),
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
