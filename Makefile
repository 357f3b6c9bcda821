# `make run`: set up and run the main job.  `make test`: set up and pass every test, XLA lane included.
PYTHON ?= python3
VENV ?= .venv
XLA_VENV ?= .venv-xla

.PHONY: setup setup-xla run test test-cpu test-xla test-gcs

setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# The CPU build of torch first, so that the project's `torch` requirement is already met.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# torch_xla 2.9 needs torch 2.9.0, so the XLA lane has an environment of its own.
setup-xla: $(XLA_VENV)/.installed
$(XLA_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/pip install -q --upgrade pip
	$(XLA_VENV)/bin/pip install -q -e '.[xla,dev]'
	touch $@

# The venv first on PATH, as if activated: Ray job drivers (`gss submit`) run `python` from PATH.
run: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" gss run

# One lane after the other. Side by side (make -j2) on CI's 2 cores, the CPU lane took 50 min beside the XLA lane
# against 22 min alone in the run before: XLA's compiles take every core while Ray's tests wait on theirs.
test: test-cpu test-xla

# Two pytest workers side by side (pytest-xdist), a whole file to each at a time, so a module's fixtures are made
# once: one at a time, the lane used a third of the CPU, most of its time waiting on Ray, servers and subprocesses.
# Files go out in collection order, the long ones first (tests/conftest.py).
TEST_WORKERS ?= 2
test-cpu: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" python -m pytest -m "not xla" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		$(PYTEST_ARGS)

# The gs:// tests alone (they are part of test-cpu): every stage against a local GCS server.
test-gcs: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" python -m pytest -m gcs $(PYTEST_ARGS)

test-xla: setup-xla
	PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 GSS_REQUIRE_XLA=1 $(XLA_VENV)/bin/python -m pytest -m xla $(PYTEST_ARGS)
