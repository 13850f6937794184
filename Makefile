# The two commands (see README):  make demo   |   make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-output

.PHONY: demo test venv lint format system-deps clean

venv: $(VENV)/.installed

# torch first, pinned to the CPU wheel; the package itself only asks for a range (torch>=2.2).
$(VENV)/.installed: pyproject.toml
	$(BIN)/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV) || \
	  { echo "$(PYTHON) -m venv failed: on Debian install python3-venv (apt-get install python3-venv, or run scripts/system-deps.sh as root), then run make again." >&2; exit 1; }; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[testing]'
	touch $@

system-deps:
	bash scripts/system-deps.sh

# sample volume -> built-in 3D U-Net -> local Parsl site (worker processes) -> N5 output
demo: venv
	$(BIN)/emparsl sample $(DEMO_DIR)/sample.n5 --overwrite
	$(BIN)/emparsl info $(DEMO_DIR)/sample.n5:raw
	$(BIN)/emparsl run --input $(DEMO_DIR)/sample.n5:raw --model unet3d-em \
	    --output $(DEMO_DIR)/sample.n5:predictions/classes --site local --overwrite
	$(BIN)/emparsl status $(DEMO_DIR)/sample.n5:predictions/classes
	$(BIN)/emparsl evaluate $(DEMO_DIR)/sample.n5:predictions/classes $(DEMO_DIR)/sample.n5:labels/classes

lint: venv
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: venv
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

test: system-deps venv lint
	xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python -m pytest

clean:
	rm -rf $(DEMO_DIR) build dist .pytest_cache
