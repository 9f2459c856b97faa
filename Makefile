# pacs-ai: the two commands of the README's Quick start are `make serve` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch/torchvision pair known to work together here (see README); override on other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEBIAN_TEST_PACKAGES := dcmtk orthanc dicom3tools postgresql systemd chromium orthanc-dicomweb orthanc-gdcm orthanc-webviewer
# OHIF v3, the web viewer the browser test opens the results in: its npm package ships a prebuilt dist/.
OHIF_VERSION := 3.13.2
OHIF_DIR := .cache/ohif-$(OHIF_VERSION)
CONFIG ?=

.PHONY: serve test install-deps install-test-deps debian-test-deps ohif install lint clean bench

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install-deps: $(VENV)/.installed

install-test-deps: $(VENV)/.installed-test debian-test-deps ohif

# The real peers the tests run against: dcmtk (storescu/storescp/dcmdump), Orthanc with its DICOMweb and
# GDCM plugins, dciodvfy, PostgreSQL, headless Chromium (driven by Playwright, no browser download), npm.
debian-test-deps:
	@missing=""; \
	for p in $(DEBIAN_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

# The OHIF viewer's prebuilt dist/ (npm pack: the package only, none of its build dependencies).
ohif: $(OHIF_DIR)/dist/index.html

$(OHIF_DIR)/dist/index.html: | debian-test-deps
	rm -rf $(OHIF_DIR).tmp && mkdir -p $(OHIF_DIR).tmp
	cd $(OHIF_DIR).tmp && npm pack -q @ohif/app@$(OHIF_VERSION) >/dev/null && \
		tar xzf ohif-app-$(OHIF_VERSION).tgz --strip-components=1 && rm ohif-app-$(OHIF_VERSION).tgz
	rm -rf $(OHIF_DIR) && mv $(OHIF_DIR).tmp $(OHIF_DIR)

## Start the daemon in the foreground with the embedded defaults (or CONFIG=FILE).
serve: install-deps
	$(VENV)/bin/pacs-ai serve $(if $(CONFIG),--config $(CONFIG),)

## Install what the tests need (Python and Debian packages) and run the whole suite.
test: install-test-deps
	$(PY) -m pytest

bench: install-test-deps
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done
	$(PY) benchmarks/bench_latency.py --full-size   # WG-04 radiographs from ../shared (skips, saying why, without)

## Static checks (settings in pyproject.toml): ruff over the code, tests and benchmarks; mypy over pacs_ai/.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check pacs_ai training tests benchmarks
	$(VENV)/bin/mypy

install: install-deps
	bash systemd/install.sh

clean:
	rm -rf $(VENV) pacs-ai-data var .pytest_cache .cache
