# The two commands of the README: `make demo` (install + run the main job on the embedded default) and
# `make test` (install + run the tests; CI runs this through .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
ICAR := $(VENV)/bin/icar
DEMO ?= demo-out
DEMO_N ?= 2000

.PHONY: install demo test clean-demo demo-assets demo-heads

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(PY) -m jobs.demo --output $(DEMO) --n $(DEMO_N)

test: install
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled $(PY) -m pytest -q --durations=15

clean-demo:
	rm -rf $(DEMO)

# Rebuilds every shipped demo weight from seed 0 (about 30 min on 2 cores): corpus, CLIP from scratch,
# exit heads (icar train-exits), router calibrated to a GFLOP budget (icar calibrate).
DEMO_CORPUS ?= build/demo-corpus
demo-assets: install
	$(ICAR) make-demo-corpus --n 22000 --val 1000 --test 1000 --seed 0 --shard-size 1000 --image-size 128 \
	    --jpeg-quality 90 --complexity-train 4000 --output $(DEMO_CORPUS)
	$(ICAR) train-demo --corpus $(DEMO_CORPUS) --output pipeline/assets/demo --epochs 3 --seed 0
	$(MAKE) demo-heads DEMO_CORPUS=$(DEMO_CORPUS)

# Exit heads on the whole train split at batch 2048 (each row's mixed-gallery negatives are the batch): exit 6 keeps
# 94 % of full-depth recall@1 among 10 000 test images, against 91 % for 4000 pairs at batch 128
# (docs/benchmarks/adaptive.md, 2026-12-07). About 4 min on 2 cores.
demo-heads: install
	rm -rf build/demo-exits
	$(ICAR) train-exits '$(DEMO_CORPUS)/train/*.tar' --val '$(DEMO_CORPUS)/val/*.tar' --model demo \
	    --max-train 20000 --max-val 1000 --batch-size 2048 --epochs 30 --lr 3e-3 --seed 0 --output build/demo-exits
	cp build/demo-exits/exit_heads.safetensors build/demo-exits/metrics.json pipeline/assets/demo/
	mv pipeline/assets/demo/metrics.json pipeline/assets/demo/exit_heads.metrics.json
	echo '{"kind": "heuristic", "input_size": 64}' > pipeline/assets/demo/scorer.json
	$(ICAR) calibrate '$(DEMO_CORPUS)/val/*.tar' --model demo --heads pipeline/assets/demo/exit_heads.safetensors \
	    --scorer default --gflops-budget 0.75 --sample 1000 --output pipeline/assets/demo/router.json
	# the confidence heads judge these exit heads' embeddings (bound to them): retrain and refit them together.
	# Target "loss" (what leaving costs the own caption vs full depth) on the whole train split: ahead of margin on
	# 8000 pairs on val at 5 of 7 budgets (docs/benchmarks/adaptive.md, 2026-12-06 20:00)
	$(ICAR) train-confidence '$(DEMO_CORPUS)/train/*.tar' --model demo --heads pipeline/assets/demo/exit_heads.safetensors \
	    --target loss --max-train 20000 --output pipeline/assets/demo
	$(ICAR) calibrate '$(DEMO_CORPUS)/val/*.tar' --model demo --heads pipeline/assets/demo/exit_heads.safetensors \
	    --confidence-heads pipeline/assets/demo/confidence_heads.safetensors --gflops-budget 0.75 --sample 1000 \
	    --output pipeline/assets/demo/confidence_router.json
