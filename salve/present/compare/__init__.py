"""Comparing two runs: the compare page, the nightly Markdown and the terminal text.

Input is plain data shaped like `dvc params diff --json` and `dvc metrics diff --json`
(``{file: {dotted.key: {"old": a, "new": b, "diff": d}}}``) plus the key metrics, declared by
the caller as KeyMetric records. Every rendering keeps one order: the parameter changes, then
every key metric, then the other metric changes grouped by file (stage), collapsed or trailing.

- ``metrics``: each metric change judged (direction, better / worse, within noise), and the
  parameter rows; cheap to import (no matplotlib, no Jinja2), for `tasks/keymetrics.py`.
- ``features``: is each class still carried by the same latent (Hungarian matching).
- ``page``: the HTML page (`build_compare_page`), with both revisions' key figures.
- ``text``: Markdown for the nightly Prefect artifact and plain text for a terminal.
- ``experiments``: several runs (DVC experiments) by their key metrics (`salve exps`).
"""
