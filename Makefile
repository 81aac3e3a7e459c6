# Two entry points for a fresh machine, both self-contained (see README.md):
#   make demo   sets up .venv and distils the real SmolLM2-135M teacher on real text (CPU, < 15 min)
#   make test   sets up .venv and runs the whole test suite, slow tests included
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# Extra --config.x=y overrides for the demo, e.g. DEMO_FLAGS="--config.steps=3" for a quick check.
DEMO_FLAGS ?=

.PHONY: demo test venv corpus lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The demo and the data tests read Debian's Python manual: real English text that needs no network
# beyond the package registry. Installing it needs root; without it the demo falls back to the
# licence texts under /usr/share/common-licenses.
corpus:
	@if [ ! -f /usr/share/info/python3.11.info.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q python3.11-doc >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q python3.11-doc >/dev/null 2>&1)) || \
		echo "note: could not install python3.11-doc; the corpus falls back to the licence texts"; \
	fi

# Train, export the student as an HF folder (hf/), then evaluate it (eval.json, plots/) and score
# it and the teacher with lm-evaluation-harness on our local tasks (lm_eval.json).
demo: venv corpus
	$(PY) scripts/train.py --config configs/demo.py --workdir $(WORKDIR) $(DEMO_FLAGS)
	$(PY) scripts/export_hf.py --workdir $(WORKDIR) --out $(WORKDIR)/hf --overwrite
	$(PY) scripts/evaluate.py --config configs/demo.py --workdir $(WORKDIR) $(DEMO_FLAGS) \
		--lm_eval_tasks=local --lm_eval_student=$(WORKDIR)/hf

test: venv corpus
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check tad_jax tests scripts configs
