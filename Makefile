# Two entry points: `make demo` (set up, pretrain on the embedded data, fine-tune each
# task from that checkpoint, print one table) and `make test`.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= workdir/demo
DATA_DIR ?= $(WORKDIR)/data
PY := $(VENV)/bin/python
# cpu | cuda | tpu: which JAX backend `make install` adds (requirements-<platform>.txt).
PLATFORM ?= cpu

.PHONY: demo two-stage matching test install clean

$(VENV)/.installed: requirements.txt setup.cfg
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# Tests only: PyTorch (CPU) for the .pt import tests and shellcheck for launch/*; see
# requirements-torch.txt. The tests also install libtpu (requirements-tpu.txt): XLA's
# TPU compiler, so that vlp.tools.aot's TPU path is tested on any machine (no TPU needed).
$(VENV)/.installed-torch: $(VENV)/.installed requirements-torch.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-torch.txt
	touch $@

# CUDA / TPU: the same pins plus JAX's plugin for that platform.
$(VENV)/.installed-cuda $(VENV)/.installed-tpu: $(VENV)/.installed-%: $(VENV)/.installed requirements-%.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-$*.txt
	touch $@

$(VENV)/.installed-cpu: $(VENV)/.installed
	touch $@

install: $(VENV)/.installed-$(PLATFORM)

FT = --config.data_dir=$(DATA_DIR) --config.init_from=$(WORKDIR)

demo: $(VENV)/.installed
	$(PY) -m vlp.pretrain --config=configs/uniter_base.py:tiny --workdir=$(WORKDIR) --config.data_dir=$(DATA_DIR)
	$(PY) -m vlp.finetune --config=configs/finetune_retrieval.py:size=tiny,data=vlp_scenes --workdir=$(WORKDIR)/ft_retrieval $(FT)
	$(PY) -m vlp.finetune --config=configs/finetune_vqa.py:size=tiny,data=vlp_scenes --workdir=$(WORKDIR)/ft_vqa $(FT)
	$(PY) -m vlp.finetune --config=configs/finetune_refcoco.py:size=tiny,data=vlp_scenes --workdir=$(WORKDIR)/ft_grounding $(FT)
	$(PY) -m vlp.tools.demo_table $(WORKDIR)

# After `make demo`: ALADIN's second stage on the demo's retrieval checkpoint (a
# dual-encoder head distilled from the frozen cross-encoder, ~6 min), then the
# table with full, dual-encoder and two-stage retrieval on the 300-image test split.
two-stage: $(VENV)/.installed
	$(PY) -m vlp.finetune --config=configs/finetune_retrieval.py:size=tiny,data=vlp_scenes,stage=dual --workdir=$(WORKDIR)/ft_retrieval_dual --config.data_dir=$(DATA_DIR) --config.init_from=$(WORKDIR)/ft_retrieval
	$(PY) -m vlp.tools.demo_table $(WORKDIR)

# Every image-text matching mechanism under one budget and seed on the demo data, one
# table and chart (docs/matching.md; about 25 minutes on 2 CPU cores).
matching: $(VENV)/.installed
	$(PY) -m vlp.tools.matching_protocol --config=configs/matching.py --config.data_dir=$(DATA_DIR) --workdir=$(WORKDIR)/matching_protocol

# Two pytest-xdist workers, each taking whole files (a module's fixtures, such as the
# learning bars' pretrained checkpoint, are built once); tests/conftest.py lists the
# longest files first and --no-loadscope-reorder keeps that order. One test process
# keeps about one core busy (mostly single-threaded XLA compilation), so on 2 cores two
# workers finish in about half the time. TEST_WORKERS=0 runs the tests in one process.
TEST_WORKERS ?= 2

test: $(VENV)/.installed-torch $(VENV)/.installed-tpu
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) workdir
