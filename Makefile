# Both README commands go through `env`, which creates/refreshes .venv (idempotent).
PY := .venv/bin/python

.PHONY: env test demo

env:
	bash tools/setup_env.sh

test: env
	$(PY) -m pytest

demo: env
	$(PY) tools/demo.py
