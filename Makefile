# `make run`: the pipeline on the built-in default. `make test`: the test suite.
# Each creates .venv and installs what it needs when that is missing or pyproject.toml changed
# (stamp files in .venv): `run` the package, `test` also the `dev` extra, `bench` also `bench`.
#
# Installs use uv when it is on PATH, or can be pip-installed into .venv/.uv, and pip otherwise,
# with the same pins either way; `make INSTALLER=pip run` forces pip. pip's own settings that
# decide where packages come from (find-links, index-url, extra-index-url, constraint, cert:
# its config files and PIP_* variables, as `pip config list` shows them) are handed to uv, which
# does not read them; nothing is passed where none is set.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
INSTALLER ?= auto
# Pinned CPU build of torch, installed with the package: any other torch spec pulls the CUDA stack.
TORCH := torch==2.13.0

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_HOME := $(CURDIR)/.prefect
# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other work, torch's threads
# otherwise spin-wait for a descheduled sibling at every parallel region: measured at load 6-7
# on 2 cores with 2 threads, a TopK SAE fit ran 11x slower, a resnet18 train step 2-4x. Read at
# torch's import, so it must come from the environment; an explicit setting wins.
export OMP_WAIT_POLICY ?= PASSIVE
# Python writes each module's bytecode (__pycache__, git-ignored) at its first import and reuses
# it. uv installs without compiling, so where PYTHONDONTWRITEBYTECODE is set (this machine sets
# it) every process compiled torch, prefect and dvc from source again: importing torch,
# torchvision and torch._dynamo took 8.7 s instead of 3.3 s, in every stage, worker and test
# process. Compiling everything at install instead took 28 s for 16,000 files, most never used.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test lint format bench bench-gpu study

# Shell functions for the stamp recipes (make does not keep a shell between recipe lines).
# find_uv: uv on PATH, else the one bootstrapped into .venv/.uv (pip install --target, once).
# pip_settings: pip's settings as `pip config list` prints them (from PIP_* alone without pip).
# install SPEC...: into .venv, with uv when found (pip's settings as uv options), else pip.
define INSTALL_FN
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1; \
find_uv() { \
  [ "$(INSTALLER)" != pip ] || return 1; \
  uv=$$(command -v uv) && return 0; \
  uv=$(VENV)/.uv/bin/uv; [ -x "$$uv" ] && return 0; \
  python3 -m pip install -q --target $(VENV)/.uv uv >/dev/null 2>&1 && [ -x "$$uv" ]; \
}; \
pip_settings() { \
  python3 -m pip config list 2>/dev/null && return 0; \
  local k v; for k in FIND_LINKS INDEX_URL EXTRA_INDEX_URL CONSTRAINT CERT; do \
    v=PIP_$$k; [ -z "$${!v:-}" ] || echo ":env:.$$(tr A-Z_ a-z- <<< $$k)='$${!v}'"; done; \
}; \
make_venv() { \
  [ -x $(PY) ] && return 0; \
  if find_uv; then python3 -m venv --without-pip $(VENV); else python3 -m venv $(VENV); fi; \
}; \
install() { \
  local uv="" opts=() key rest v seen=" " seen_index="" extra=""; \
  if ! find_uv; then \
    echo "[make] installing with pip: $$*"; \
    $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip -q --upgrade; \
    $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q "$$@"; return; \
  fi; \
  while read -r key rest; do \
    for v in $$rest; do \
      case "$$seen" in *" $$key=$$v "*) continue;; esac; seen+="$$key=$$v "; \
      case $$key in \
        index-url) [ -n "$$seen_index" ] || opts+=(--index-url "$$v"); seen_index=1;; \
        extra-index-url) opts+=(--extra-index-url "$$v"); extra=1;; \
        cert) [ -n "$${SSL_CERT_FILE:-}" ] || export SSL_CERT_FILE="$$v";; \
        *) opts+=("--$$key" "$$v");; \
      esac; \
    done; \
  done < <(pip_settings | sed -nE \
    "s/^(global|install|:env:)\.(find-links|index-url|extra-index-url|constraint|cert)='(.*)'$$/\2 \3/p"); \
  [ -z "$$extra" ] || opts+=(--index-strategy unsafe-best-match); \
  echo "[make] installing with $$("$$uv" --version): $$*"; \
  "$$uv" pip install -q --python $(PY) "$${opts[@]}" "$$@"; \
}
endef

$(STAMP): pyproject.toml
	@$(INSTALL_FN); make_venv && install $(TORCH) -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	@$(INSTALL_FN); install $(TORCH) -e '.[dev]'
	touch $(DEV_STAMP)

$(BENCH_STAMP): $(DEV_STAMP)
	@$(INSTALL_FN); install $(TORCH) -e '.[dev,bench]'
	touch $(BENCH_STAMP)

run: $(STAMP)
	$(VENV)/bin/salve run

# One pytest worker per core (pytest-xdist), each test module on one worker so that its module
# fixtures (a built project, an experiment) are made once.
test: $(DEV_STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# The study's DVC stages (study/dvc.yaml) after `make run`: DVC skips or restores what is up to
# date, so a second `make study` recomputes nothing (docs/PIPELINE.md, "The study").
study: $(STAMP)
	$(VENV)/bin/salve study

# The component benchmarks, the CPU kernel modes at 224 px (the pin's cost: about 35 minutes),
# then the whole pipeline at paper scale (224 px, 1k/4k/16k images, SAE widths 64 and 4096:
# hours on 2 CPU cores). All merge into benchmarks/results.json.
bench: $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/bench_kernels.py --write
	$(PY) benchmarks/bench_paper_scale.py --write

# On a CUDA machine: the 224-px pipeline end to end on 4k images at both widths (one fine-tuning
# epoch in bf16 autocast first), outputs checked, stage times as multiples of the GPU's own bare
# forward pass.
bench-gpu: $(BENCH_STAMP)
	$(PY) benchmarks/bench_paper_scale.py --device cuda --sizes 4000 --threads 8 --finetune-epochs 1
