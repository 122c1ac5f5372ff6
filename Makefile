# `make demo` and `make test` set up .venv on first use with the exact versions of
# constraints.txt (pip takes torch and torchvision from the local wheel cache or PyPI), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test install clean mutation venv-gpu-stack gpu-wheels

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# One thread unless told otherwise: the built-in models are small, and on a shared machine two
# threads that wait on each other ran the demo several times slower than one.
demo: $(BIN)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/reprogrammer demo --out $(OUT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml; about an hour or more on
# 2 cores, not part of CI). Runs in .mutation/, a copy of the tracked files with kernels/ and
# export/ placed inside reprogrammer/ as installed; `make mutation` again resumes, results stay there.
mutation: $(BIN)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[mutation]'
	mkdir -p .mutation
	git ls-files | tar -cf - -T - | tar -xf - -C .mutation
	rm -rf .mutation/reprogrammer/kernels .mutation/reprogrammer/export
	mv .mutation/kernels .mutation/reprogrammer/kernels
	mv .mutation/export .mutation/reprogrammer/export
	cd .mutation && OMP_NUM_THREADS=1 ../$(BIN)/python -m mutmut run --max-children 2
	cd .mutation && ../$(BIN)/python -m mutmut results

# The GPU machines' stack (torch 2.11, which pins triton 3.6), to test the declared lower bounds:
# a venv of its own with every other package at constraints.txt's version, then the kernel
# (Triton's interpreter), model and doctor tests in it. Not part of CI: PyPI has only the CUDA
# build of torch for Linux, about 4 GB with its CUDA libraries (a few minutes). numpy stays below
# 2.4 there: triton 3.6's interpreter converts one-element arrays with int(), which numpy 2.4
# refuses (compiled kernels never run that code). Another pair: `make venv-gpu-stack
# GPU_STACK_TORCH=2.x.y GPU_STACK_TORCHVISION=0.z.w GPU_STACK_VENV=.venv-torch2x`.
GPU_STACK_VENV ?= .venv-gpu-stack
GPU_STACK_TORCH ?= 2.11.0
GPU_STACK_TORCHVISION ?= 0.26.0
GPU_STACK_NUMPY ?= 2.3.5
GPU_STACK_TESTS ?= tests/test_reprogram_patch_embed.py tests/test_residual_logits.py \
	tests/test_reference_ops.py tests/test_model.py tests/test_doctor.py

$(GPU_STACK_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(GPU_STACK_VENV)
	grep -vE '^(torch|torchvision|triton|numpy|sympy|nvidia-[a-z0-9-]*|cuda-[a-z-]*)==' constraints.txt >$(GPU_STACK_VENV)/constraints.txt
	$(GPU_STACK_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_STACK_VENV)/bin/python -m pip install -q -c $(GPU_STACK_VENV)/constraints.txt \
		torch==$(GPU_STACK_TORCH) torchvision==$(GPU_STACK_TORCHVISION) numpy==$(GPU_STACK_NUMPY) -e '.[dev]'
	touch $@

venv-gpu-stack: $(GPU_STACK_VENV)/.installed
	$(GPU_STACK_VENV)/bin/python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
	OMP_NUM_THREADS=1 $(GPU_STACK_VENV)/bin/python -m pytest -q -p no:cacheprovider -m 'not slow' $(GPU_STACK_TESTS)

# The wheels bench/gpu_check.sh carries to a GPU machine (Python 3.12, x86_64, no network, every
# dependency there but open_clip's ftfy and its wcwidth): exactly these, at constraints.txt's
# versions, into the git-ignored .whl/ (emptied first: two versions of one package stop the install).
GPU_WHEELS := open_clip_torch ftfy wcwidth

gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
		$(foreach name,$(GPU_WHEELS),$(shell grep -i '^$(name)==' constraints.txt))
	ls .whl

clean:
	rm -rf $(VENV) $(GPU_STACK_VENV) runs .mutation
