# Two commands on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# configs/demo.yaml's trainer.default_root_dir: the demo's paths derive from it.
DEMO := runs/demo
SEED ?= 0

.PHONY: install demo demo-data demo-train demo-eval demo-export test test-fast lint clean-demo

install: $(VENV)/.installed

# Re-install when the project's dependencies change.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The embedded default: build the demo world (images, clips, document pages) and a tiny random Qwen2-VL (a
# family that reads video), train it with the gradient cache (MMEB, MMEB-V2 and XTD scores logged to
# TensorBoard during training), score the untrained and trained models, and export the trained one (model
# card with its scores; loads with Embedder, sentence-transformers and mteb).
demo: install demo-data demo-train demo-eval demo-export

demo-data: $(DEMO)/world/world.json $(DEMO)/backbone/config.json

$(DEMO)/world/world.json:
	$(PY) -m mme5.demo --out $(DEMO)/world --seed $(SEED)

$(DEMO)/backbone/config.json: $(DEMO)/world/world.json
	$(PY) -m mme5.backbones.tiny --family qwen2_vl --preset demo-video --out $(DEMO)/backbone --seed $(SEED) \
		--corpus $(DEMO)/world/corpus.txt

# A new run each time (--overwrite: the previous run's checkpoints, logs and config go; world and backbone stay).
demo-train: demo-data
	$(PY) train.py fit --config configs/demo.yaml --overwrite

# demo-train makes a new checkpoint each time: its scores and export replace the previous ones (--overwrite).
demo-eval: $(DEMO)/eval/untrained/scores.json
	$(PY) -m mme5.eval --model $(DEMO)/checkpoints/last.ckpt --data $(DEMO)/world --out $(DEMO)/eval/trained \
		--overwrite
	$(PY) -m mme5.eval.compare $(DEMO)/eval/untrained $(DEMO)/eval/trained

# The untrained model's scores change only with the backbone (rebuilt with the world): then replaced.
$(DEMO)/eval/untrained/scores.json: $(DEMO)/backbone/config.json
	$(PY) -m mme5.eval --model $(DEMO)/backbone --data $(DEMO)/world --out $(DEMO)/eval/untrained --overwrite

demo-export:
	$(PY) -m mme5.export --ckpt $(DEMO)/checkpoints/last.ckpt --out $(DEMO)/exported --scores $(DEMO)/eval/trained \
		--query-instruction "Find me an everyday image that matches the given caption:" \
		--target-instruction "Represent the given image." --overwrite

# --durations: the slowest tests close every run, so a CI log says where its minutes went.
test: install
	$(PY) -m pytest -q --durations=20

# The suite without the tests marked slow (the family matrix, the end-to-end train.py run): see README.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check mme5 tests benchmarks train.py

clean-demo:
	rm -rf $(DEMO)
