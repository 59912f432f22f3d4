# One command for each thing a developer or CI does. Every target first runs
# scripts/setup.sh, which installs rabbitmq-server and the .venv when they are missing
# and returns quickly when they are in place. The demo and the tests start their own
# private RabbitMQ node on 127.0.0.1; no target starts a system broker.
#
# Extra arguments: make test PYTEST_ARGS='-k node -x', make demo DEMO_ARGS='--rounds 5'.

SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test bench lint

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/fedmq demo $(DEMO_ARGS)

# pytest's non-zero exit statuses, 5 ("no tests collected") included, fail the target.
test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PYTHON) -m benchmarks

lint: setup
	$(PYTHON) -m mypy
