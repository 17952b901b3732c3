# The two commands of the quick start are `make demo` and `make test`; everything they need is
# installed here into .venv, so a fresh machine with Python 3.11 is enough.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench chart-files clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/maintainer demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check maintainer tests bench
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

bench: $(STAMP)
	for script in engine partitions_vs_partman bloat_accuracy anonymize daemon pacing; do \
		$(BIN)/python bench/$$script.py || exit 1; \
	done

# The alert rules and dashboard the chart ships, from the built-in units (no maintainer.yaml is read:
# the commands run where there is none); tests/test_rules.py fails when they are out of date.
chart-files: $(STAMP)
	cd helm/maintainer/files && env -u MAINTAINER_CONFIG $(abspath $(BIN))/maintainer rules --output prometheus-rules.yaml
	cd helm/maintainer/files && env -u MAINTAINER_CONFIG $(abspath $(BIN))/maintainer dashboard --output dashboard.json

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis
