# `make demo` and `make test` set up .venv on first use with the exact versions of
# constraints.txt (pip takes torch and torchvision from the local wheel cache or PyPI), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test install clean mutation

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

clean:
	rm -rf $(VENV) runs .mutation
