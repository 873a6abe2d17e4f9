# Two entry points: `make demo` (set up + pretrain on the embedded data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= workdir/demo
DATA_DIR ?= $(WORKDIR)/data
PY := $(VENV)/bin/python

.PHONY: demo test install clean

$(VENV)/.installed: requirements.txt setup.cfg
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m vlp.pretrain --config=configs/uniter_base.py:tiny --workdir=$(WORKDIR) --config.data_dir=$(DATA_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) workdir
