# Entry points. Each target sets up what it needs (tools/bootstrap.sh is cached and fast after the first run).
PY := .build/venv/bin/python
PORT ?= 8188
MODELS_DIR ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow mutants serve bench clean

setup:
	@bash tools/bootstrap.sh

demo: setup
	@$(PY) tools/demo.py

# The suite without the slow checks (marker `slow`: benchmarks, reference-model gates, multi-rank and process-safety
# runs); CI (.ci/run) runs both targets.
test: setup
	@$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	@$(PY) -m pytest tests -m slow $(PYTEST_ARGS)

# Plants each bug of tests/mutants.toml in a copy of the repository and runs the tests that must catch it.
mutants: setup
	@$(PY) tools/mutants.py --out bench/results/mutants.md

serve: setup
	@$(PY) tools/serve.py --port $(PORT) $(if $(MODELS_DIR),--models-dir "$(MODELS_DIR)")

bench: setup
	@$(PY) bench/run.py
	@$(PY) bench/overhead.py
	@$(PY) bench/vae_memory.py
	@$(PY) bench/server.py
	@$(PY) bench/native.py
	@$(PY) bench/fp8_scaled.py

clean:
	rm -rf .build out
