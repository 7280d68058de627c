# Both README commands go through `env`, which creates/refreshes the virtualenv (idempotent).
# VENV=DIR puts it elsewhere; STACK=onedl installs the OneDL forks (tools/stacks/*.txt).
VENV ?= $(CURDIR)/.venv
STACK ?= upstream
PY := $(VENV)/bin/python
# the maintained forks get their own environment: one environment holds one stack
ONEDL_VENV ?= $(CURDIR)/.venv-onedl
ONEDL_TESTS := tests/test_backbone.py tests/test_checkpoints.py tests/test_trust.py \
	tests/test_config_scope.py tests/test_tools_e2e.py::test_train_test_infer_detection

.PHONY: env test test-quick demo env-onedl test-onedl

env:
	VENV=$(VENV) bash tools/setup_env.sh --stack $(STACK)

# three pytest processes of one thread each: many tests wait on the tools and launchers they
# run, and on 2 cores the other processes fill those waits (docs/README.md)
test: env
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 3 --dist loadfile --no-loadscope-reorder

# the unit tests, for edit loops: what is not marked slow (setup.cfg)
test-quick: env
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

demo: env
	$(PY) tools/demo.py

env-onedl:
	VENV=$(ONEDL_VENV) bash tools/setup_env.sh --stack onedl

# the backbone, checkpoint, trust and config-scope tests and one train+test+infer of the
# detection demo config, on the OneDL fork stack
test-onedl: env-onedl
	$(ONEDL_VENV)/bin/python -m pytest $(ONEDL_TESTS)
