# The two commands of the README: `make run` (the pipeline) and `make test`.
# Both create .venv when missing and install the library with every extra first (workflow, data, test:
# pyproject.toml); the library alone is `pip install .`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# stages run `python -m stages.X` and tests run `dvc`: both must be the venv's
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test install data-packages browser

run: install
	dvc repro

test: install browser
	python -m pytest -q

install: $(STAMP) data-packages

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[workflow,data,test]'
	# animal-mnist's metadata wrongly requires tensorflow: it is only a pickle of arrays
	$(BIN)/python -m pip install -q --no-deps animal-mnist==0.4
	touch $(STAMP)

# Fashion-MNIST (the source task) ships as a Debian package; without it (or
# without root), xbar falls back to torchvision's download where there is a network.
data-packages:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >/dev/null; \
	  else echo "note: install the Debian package dataset-fashion-mnist (or set source.dataset.root)"; fi; }

# tests/test_browser.py drives Debian's Chromium through Playwright (Playwright's own browser
# download needs a network); without it (or without root) the test is skipped, except under CI.
browser:
	@command -v chromium >/dev/null || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }) >/dev/null; \
	  else echo "note: install the Debian package chromium for the browser test"; fi; }
