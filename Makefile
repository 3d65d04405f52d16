# Two commands on a machine with nothing but Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv sysdeps clean

venv: $(STAMP)

# bubblewrap: the OS boundary of the reward-code sandbox (docs/security.md); chromium: the headless
# browser of the labeling app's end-to-end test (docs/labeling.md). Installed from the distribution
# when missing and this is a root shell on Debian/Ubuntu; otherwise a note says how.
sysdeps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; }; \
	  else \
	    echo "note: bubblewrap (bwrap) is not installed; model-written reward code will be refused until it is"; \
	    echo "      (Debian/Ubuntu: sudo apt-get install bubblewrap; Fedora: sudo dnf install bubblewrap)"; \
	  fi; }
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	    echo "note: chromium could not be installed; the labeling browser test will be skipped"; \
	  else \
	    echo "note: chromium is not installed; the labeling browser test (tests/test_labeling_browser.py) is skipped"; \
	    echo "      (Debian: sudo apt-get install chromium; Ubuntu: sudo apt-get install chromium-browser)"; \
	  fi; }

# torch first, pinned: 2.13.0 is the CPU build (a range would pull a multi-GB CUDA build)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP) sysdeps
	$(BIN)/rlxf demo --output-dir runs/demo

# one pytest-xdist worker per core (at most 4); `make test TEST_WORKERS=0` runs in one process
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
