# Quick start: `make demo` (main job on the embedded default model) and `make test`.
# Both install what they need first (idempotent; re-runs only when pyproject.toml changes).
PYTHON ?= python3
STAMP := .cache/install.stamp
export TVM_NUM_THREADS ?= 2

.PHONY: install demo test test-fast bench

$(STAMP): pyproject.toml tools/install_system_deps.sh
	bash tools/install_system_deps.sh
	$(PYTHON) -m pip install --quiet -e ".[models,test]"
	mkdir -p .cache && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m qcompile demo

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PYTHON) tools/bench.py
