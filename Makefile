# The two commands of the README: `make demo` (install + run the main job on the embedded default) and
# `make test` (install + run the tests; CI runs this through .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
ICAR := $(VENV)/bin/icar
DEMO ?= demo-out
DEMO_N ?= 2000

.PHONY: install demo test clean-demo

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m jobs.demo --output $(DEMO) --n $(DEMO_N)

test: install
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO)
