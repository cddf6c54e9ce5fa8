# `make demo` and `make test` are the two commands of the README; each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	$(PY) -m pip install -q --no-deps -c constraints.txt lmms-eval  # pins av<16; its model API needs only [lmms]
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo

# the default suite (CI): everything but the `slow` matrices; end-to-end runs of each CLI stay in it
test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15

BENCHMARKS := $(filter-out benchmarks/common.py,$(wildcard benchmarks/*.py))

bench: $(STAMP)
	@for script in $(BENCHMARKS); do echo "== $$script"; $(PY) $$script --quick || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info runs
