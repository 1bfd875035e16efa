"""Building blocks for the study of docs/METHOD.md's open questions.

1. adversarial + stats + vulnerability: does a low alpha_crit predict adversarial vulnerability?
2. variants + variant_edits: do other SAE kinds give more precise edits (at matched L0)?
3. deeper + concept: can an edit inside the backbone change how a concept forms?

Import from the submodules: this package imports none of them, so each study stage depends
(tasks/deps.py) only on the modules its own question uses.
"""
