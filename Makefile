# `make test` and `make demo` set up everything they need: .venv, the package, its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (a local file on this project's machines); an unpinned torch pulls CUDA.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,notebooks,real

.PHONY: install test test-fast test-interop demo lint bench bench-peers test-peers notebooks aux-variants clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -x -m "not slow"

# The SAELens export against the real SAELens, in its own venv (make test never installs sae-lens).
INTEROP_VENV ?= .venv-interop
SAELENS_SPEC ?= sae-lens==6.54.12

$(INTEROP_VENV)/.installed: pyproject.toml Makefile
	test -x $(INTEROP_VENV)/bin/python || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(INTEROP_VENV)/constraints.txt
	$(INTEROP_VENV)/bin/python -m pip install -q -c $(INTEROP_VENV)/constraints.txt -e ".[dev]" "$(SAELENS_SPEC)"
	touch $@

test-interop: $(INTEROP_VENV)/.installed
	$(INTEROP_VENV)/bin/python -m pytest -q -rs tests/test_saelens_interop.py

lint: install
	$(PY) -m ruff check allocation tests benchmarks

# TopK, Feature Choice and Mutual Choice SAEs (aux_zipf_loss) on 50k MiniLM-L6 layer-3 activations of the
# standard library's docstrings (extracted once, cached): comparison table + runs/demo/comparison.png.
demo: install
	$(VENV)/bin/allocation solve --random 8x16 --seed 0 --topk 2
	$(VENV)/bin/allocation train --rule topk,feature-choice,mutual-choice --data minilm \
		--data-option n_tokens=50000 --data-option progress=true --k 16 --n-features 1536 --aux zipf \
		--tokens 122880 --batch-size 512 --lr 2e-3 --metrics-every 40 --threads 1 \
		--out runs/demo --overwrite --plot runs/demo/comparison.png

# Every benchmark (JSON in benchmarks/results/), then the README's performance section from them.
bench: install
	$(PY) benchmarks/run_all.py

# Peer benchmark: sparsify and SAELens vs allocation's rules on MiniLM activations, README "Peers" table.
# The peers live in their own venv (.venv-peers, extra `peers`); make test never installs them. The
# constraints file keeps pip on the local CPU torch (an unpinned dependency would pull a CUDA build).
PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_ARGS ?=

$(PEERS_VENV)/.installed: pyproject.toml Makefile benchmarks/peers-constraints.txt
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q "$(TORCH_SPEC)"
	$(PEERS_PY) -m pip install -q -c benchmarks/peers-constraints.txt -e ".[peers,real,dev]"
	touch $@

bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_PY) benchmarks/bench_peers.py $(PEERS_ARGS)

# The adapter tests with the peers importable (in .venv they skip).
test-peers: $(PEERS_VENV)/.installed
	$(PEERS_PY) -m pytest -q tests/test_peers.py

# aux_zipf_loss's deficit variants vs aux_k_loss at the dead-feature setting (3 seeds, 1 thread per run;
# about an hour of CPU on a 2-core machine; runs already in the results file are kept), then the README table.
AUX_VARIANTS_ARGS ?= --jobs 2
aux-variants: install
	$(PY) benchmarks/aux_variants.py $(AUX_VARIANTS_ARGS)
	$(PY) benchmarks/aux_variants.py --report

# Re-execute every tutorial in place, keeping its outputs (inline figures: no MPLBACKEND override).
notebooks: install
	for notebook in tutorials/[0-9]*.ipynb; do \
	  env -u MPLBACKEND $(PY) -m nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.kernel_name=python3 --ExecutePreprocessor.timeout=600 \
	    --ExecutePreprocessor.record_timing=False "$$notebook" || exit 1; \
	done

clean:
	rm -rf $(VENV) $(INTEROP_VENV) $(PEERS_VENV) .pytest_cache .hypothesis build *.egg-info
