# Two commands do all the set-up on a fresh machine:
#   make demo   - create the environment, install, run the live demo (simulator -> daemon -> table)
#   make test   - create the environment, install, run linters, layer checks and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DURATION ?= 30
EXTRAS ?= cpu,train,dev,triton,ray
# the Triton server of the nvidia-pytriton wheel (tests/triton_server.py): its own venv, as the
# wheel pins numpy<2; onnxruntime runs the models inside the server's Python stub
TRITON_VENV ?= .venv-triton
PYTRITON ?= nvidia-pytriton==0.7.0

.PHONY: install triton-env demo test lint unit system bench train clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch comes first, pinned, from the local CPU wheel (a plain "torch" would pull a CUDA build)
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q '$(PYTRITON)' 'onnxruntime>=1.17'
	touch $@

triton-env: $(TRITON_VENV)/.installed

demo: install
	$(BIN)/nanoscout demo --duration $(DURATION)

# mypy reads its files from pyproject.toml: the package, tests, benchmarks, examples, conftest.py
lint: install
	$(BIN)/ruff check src tests benchmarks examples conftest.py
	$(BIN)/lint-imports
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest tests/unit -q

system: install
	$(BIN)/python -m pytest tests/system tests/browser -q

test: lint
	$(BIN)/python -m pytest -q --cov --cov-report=term --cov-report=xml:coverage.xml

bench: install
	$(BIN)/python benchmarks/latency.py --out benchmarks/results/latency.json
	$(BIN)/python benchmarks/classify.py --out benchmarks/results/classify.json
	$(BIN)/python benchmarks/search.py --out benchmarks/results/search.json

# every shipped model: the general detector and its score calibration (fitted on the tuning
# sets only), the STEM detector (uncalibrated: its one tuning material, Pt, is in its training
# data), the classifier and the lens
train: install
	$(BIN)/nanoscout models train --out models/weights
	$(BIN)/nanoscout models calibrate --model models/weights/detector.onnx --sets emps-tune,synthetic-tune
	$(BIN)/nanoscout models train --variant stem --out models/weights
	$(BIN)/nanoscout models train-classifier --out models/weights
	$(BIN)/nanoscout models train-lens --out models/weights
	$(BIN)/nanoscout models train-modality --out models/weights

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache .mypy_cache .ruff_cache
