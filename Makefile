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

# torch first, pinned: 2.13.0 is the CPU build (a range would pull a multi-GB CUDA build).
# pip byte-compiles one file at a time; compileall does it on every core instead (a third less install
# time on 2 cores). Model families rlxf does not load and the packages' own tests are left to compile
# on first import; a file a package ships that does not compile is reported and skipped, as pip does.
COMPILE_SKIP := 'transformers/models/(?!(auto|llama|mistral|qwen2|qwen3)/)|/tests?/'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-compile -e ".[test]"
	-$(BIN)/python -m compileall -q -j 0 -x $(COMPILE_SKIP) \
	  "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null
	touch $(STAMP)

demo: $(STAMP) sysdeps
	$(BIN)/rlxf demo --output-dir runs/demo

# one pytest-xdist worker per core (at most 4); `make test TEST_WORKERS=0` runs in one process
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
