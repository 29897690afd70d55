# One-command entry points. `make demo` and `make test` create .venv on first use and
# reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL := gist-workbench

.PHONY: install demo test lint lab bench results clean-reports

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "GIST workbench" >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/workbench run demo

lint: $(STAMP)
	$(VENV)/bin/ruff check workbench tests benchmarks

# nbval runs the notebooks exactly as stored, with their demo defaults (outputs in reports/lab).
test: $(STAMP) lint
	$(PY) -m pytest -q tests
	rm -rf reports/lab
	if ls notebooks/[0-9][0-9]_*.ipynb >/dev/null 2>&1; then $(PY) -m pytest -q --nbval-lax -p no:cacheprovider notebooks; fi

# reports/RESULTS.md from the finished demo run (runs the demo first when it is missing; `make demo results`
# refreshes it with the current code). The generator is workbench/results.py.
results: $(STAMP)
	test -f reports/demo/metrics.json || $(VENV)/bin/workbench run demo
	$(PY) -m workbench.results --run reports/demo --out reports/RESULTS.md

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

bench: $(STAMP)
	$(PY) benchmarks/bench_match.py
	$(PY) benchmarks/bench_probe.py
	$(PY) benchmarks/bench_finetune.py

clean-reports:
	find reports -mindepth 1 -maxdepth 1 ! -name README.md ! -name RESULTS.md ! -name figures -exec rm -rf {} +
