# Set-up on a fresh machine is `make demo` or `make test`: both create .venv,
# install what the project needs, build the extension and install imaml_ext
# (editable, with the imaml-train command) into .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

# The CUDA kernels are compiled whenever a CUDA toolkit is here, even without a
# GPU, so a CUDA compile error fails `make test`. REQUIRE_CUDA_BUILD=1 (CI)
# makes a missing toolkit an error instead of a CPU-only build.
# setup.py asks nvcc where its toolkit is, or takes CUDA_HOME.
NVCC := $(or $(wildcard $(CUDA_HOME)/bin/nvcc),$(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
ifneq ($(NVCC),)
CUDA_ENV := IMAML_EXT_FORCE_CUDA=1 IMAML_EXT_EXPECT_CUDA_KERNELS=1
else ifeq ($(REQUIRE_CUDA_BUILD),1)
$(error REQUIRE_CUDA_BUILD=1 but no CUDA toolkit (nvcc) was found: set CUDA_HOME)
else
CUDA_ENV := IMAML_EXT_NO_CUDA=1
endif
RUN := PATH=$(abspath $(VENV))/bin:$$PATH $(CUDA_ENV)

.PHONY: demo demo-seeds ops-demo test build bench reproduce gpu-check clean

# The main job: a short Omniglot 5-way 1-shot training (about 5 minutes on 2 CPU
# cores), meta-test accuracy on 600 tasks beside the random initialisation's.
# Without Omniglot on disk it downloads the official zips (--download). The CG damping
# is the command line's default, the iMAML authors' (--cg_damping 1 --lam_damping 10).
DEMO_ARGS ?= --hidden_size 32 --meta_batch_size 16 --inner_steps 5 --cg_iterations 3 --query 5 \
	--steps 200 --meta_lr 3e-3 --log_every 20 --valid_every 100 \
	--valid_tasks 100 --download
demo: $(BUILD_STAMP)
	$(RUN) $(PY) -m imaml_ext.train $(DEMO_ARGS)

# The demo's figure as a sample: the same run for seeds 0, 1 and 2 (runs/demo-seeds/seed<N>),
# then the mean and spread beside each seed's in benchmarks/results/demo-seeds-*.{json,md}.
DEMO_SEEDS ?= 0 1 2
demo-seeds: $(BUILD_STAMP)
	$(RUN) $(PY) benchmarks/demo_seeds.py --seeds $(DEMO_SEEDS) -- $(DEMO_ARGS)

# The fused ops on a small regression meta-gradient, checked against a dense solve.
ops-demo: $(BUILD_STAMP)
	$(RUN) $(PY) -m imaml_ext.demo

test: $(BUILD_STAMP)
	$(RUN) $(PY) -m pytest python_tests

build: $(BUILD_STAMP)

# The CPU half of the benchmark report, each writing JSON + markdown (+ PNG) into
# benchmarks/results/: fused ops, the meta-step against the machine's floor, the
# HVPs of a solve four ways, peak memory against inner steps (iMAML flat, MAML
# growing) and T, the meta-step against plain PyTorch (5-way 1-shot and 20-way
# 5-shot), MAML against learn2learn, the Betty tutorial batched by the Engine
# (BETTY_DIR=folder holding Betty 0.1.1's betty package, for its column);
# then report.py gathers them into results/<machine>-<date>.{json,md,png}.
bench: $(BUILD_STAMP)
	$(RUN) PYTHONPATH=. $(PY) benchmarks/bench_ops.py --device cpu
	$(RUN) PYTHONPATH=. $(PY) benchmarks/bench_floor.py --device cpu
	$(RUN) PYTHONPATH=. $(PY) benchmarks/bench_hvp.py --device cpu
	$(RUN) PYTHONPATH=. $(PY) benchmarks/sweep_memory.py --device cpu
	$(RUN) PYTHONPATH=. $(PY) benchmarks/sweep_memory.py --device cpu --sweep tasks
	$(RUN) PYTHONPATH=. $(PY) benchmarks/bench_meta_step.py --device cpu
	$(RUN) PYTHONPATH=. $(PY) benchmarks/bench_meta_step.py --device cpu --ways 20 --shots 5 --tasks 8 \
		--variants ours_batched,ours_sequential,plain_loop,plain_vmap --check-tasks 1
	$(RUN) PYTHONPATH=. $(PY) benchmarks/bench_maml.py --device cpu
	$(RUN) PYTHONPATH=. $(PY) benchmarks/bench_dropin.py --device cpu $(if $(BETTY_DIR),--betty $(BETTY_DIR))
	$(RUN) $(PY) benchmarks/report.py

# The iMAML paper's Omniglot table: runs or resumes each of imaml-train's presets
# (omniglot-5w1s, -5w5s, -20w1s, -20w5s: 20,000 meta-steps each, a GPU's work) in
# runs/reproduce/<preset>, then writes benchmarks/results/accuracy-<machine>-<date>.{json,md,png}
# beside the paper's and Betty's figures, and the machine's report. REPRODUCE_ARGS picks, e.g.
# --presets omniglot-5w1s --time_budget 540 (go on with the same command), or
# --collect RUN_FOLDER ... (a finished run, nothing trained); -- then passes options to imaml-train.
REPRODUCE_ARGS ?=
reproduce: $(BUILD_STAMP)
	$(RUN) $(PY) benchmarks/reproduce.py $(REPRODUCE_ARGS)
	$(RUN) $(PY) benchmarks/report.py

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt scripts/install_learn2learn.sh | $(PY)
	$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt
	bash scripts/install_learn2learn.sh $(PY)
	touch $@

# The package is installed into the venv editable (imaml_ext/ is what runs), so
# .venv/bin/imaml-train and `import imaml_ext` work from any folder; the extension
# is built against the venv's torch, incrementally in build/ (see setup.py).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	@echo "imaml_ext: building the extension ($(if $(findstring FORCE_CUDA,$(CUDA_ENV)),CPU + CUDA kernels with $(NVCC),CPU kernels only: no CUDA toolkit found)) and installing imaml_ext into $(VENV), editable"
	$(RUN) $(PY) -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
	touch $@

# On a machine with a GPU and a CUDA build of torch already installed: builds
# against that python3 and torch (installs nothing), runs the CUDA tests and the
# GPU half of the benchmark report within a time budget (GPU_CHECK_BUDGET_S), and
# prints a short table. Results land in benchmarks/results/, packed with the logs
# into $(GPU_OUT)/gpu-check.tar.gz.
GPU_OUT ?= benchmarks/results
gpu-check:
	bash scripts/gpu_check.sh "$(GPU_OUT)"

clean:
	rm -rf build imaml_ext/_C*.so $(BUILD_STAMP)
