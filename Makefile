# Two entry points for a new user: `make demo` and `make test`. Both set up ./.venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.gkd-installed

.PHONY: demo test setup lint pack clean

setup: $(STAMP)

# The venv reuses a system CUDA torch when one exists (--system-site-packages); otherwise it takes the
# CPU build torch==2.13.0 first, so that the package's torch>=2.6 range never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gkd plan

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

# Rebuild the shipped facts pack (gkd/data/pack) after changing how specs or model facts are computed.
pack: $(STAMP)
	$(PY) -m gkd.planner.pack

lint: $(STAMP)
	$(VENV)/bin/ruff check gkd tests benchmarks

clean:
	rm -rf $(VENV)
