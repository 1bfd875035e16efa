"""Building blocks for the study of docs/METHOD.md's open questions.

1. adversarial + stats: does a low alpha_crit predict adversarial vulnerability?
2. variants: do other SAE kinds give more precise edits (at matched L0)?
3. deeper: can an edit inside the backbone change how a concept forms?
"""

from salve.study.adversarial import (
    input_box,
    minimal_perturbation,
    perturbation_bracket,
    pgd_attack,
    pixel_space,
)
from salve.study.deeper import (
    edit_block_output,
    edited_accuracy,
    pooled_activations,
    resolve_block,
)
from salve.study.stats import spearman_ci, spearman_ci_per_class
from salve.study.variants import SAE_VARIANTS, fit_variant, match_l0_by_l1, sae_variants

__all__ = [
    "SAE_VARIANTS",
    "edit_block_output",
    "edited_accuracy",
    "fit_variant",
    "input_box",
    "match_l0_by_l1",
    "minimal_perturbation",
    "perturbation_bracket",
    "pgd_attack",
    "pixel_space",
    "pooled_activations",
    "resolve_block",
    "sae_variants",
    "spearman_ci",
    "spearman_ci_per_class",
]
