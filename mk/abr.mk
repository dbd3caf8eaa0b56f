# ABR analysis (abr/). Every recipe line is one python command (sh and cmd.exe alike).
# Preprocessed caches live under data/abr/<config name> (never runs/, which `make clean` deletes).
#   make abr-demo                              whole pipeline at smoke size -> runs/demo/abr/ (data: data/abr/smoke)
#   make abr-preprocess [CONFIG=configs/abr/baseline.yaml]
#   make abr-train [CONFIG=configs/abr/baseline.yaml] [ARGS=--resume]
#   make abr-validate / abr-bench [CONFIG=...]  (the run of that config)
#   make abr-diffusion / abr-generate [ABR_DIFFUSION_CONFIG=...]
#   make abr-predict INPUT=exports/ [CONFIG=...] [ARGS="--set data.units=nV"]  (no labels, no split)
#   make abr-bench-exports [CONFIG=...]          the model on its synthetic test ears re-exported as labs do
ABR_CONFIG = $(or $(CONFIG),configs/abr/production_improved.yaml)
ABR_NAME = $(basename $(notdir $(ABR_CONFIG)))
ABR_DATA = data/abr/$(ABR_NAME)
ABR_RUN = runs/abr/train/$(ABR_NAME)
ABR_DIFFUSION_CONFIG ?= configs/abr/diffusion.yaml
ABR_DIFFUSION_NAME = $(basename $(notdir $(ABR_DIFFUSION_CONFIG)))
ABR_DIFFUSION_DATA = data/abr/$(ABR_DIFFUSION_NAME)
ABR_DEMO_DATA = data/abr/smoke
ABR_INPUT = $(or $(INPUT),data/abr/exports)

DEMO_TARGETS += abr-demo
.PHONY: abr-demo abr-preprocess abr-train abr-validate abr-bench abr-diffusion abr-generate abr-predict abr-bench-exports

abr-demo: setup
	$(PYTHON) -m abr.preprocess_abr --config configs/abr/smoke.yaml --output-dir $(ABR_DEMO_DATA)
	$(PYTHON) -m abr.train_abr --config configs/abr/smoke.yaml --data $(ABR_DEMO_DATA) --output-dir runs/demo/abr/train
	$(PYTHON) -m abr.validate_abr --config configs/abr/smoke.yaml --checkpoint runs/demo/abr/train --data $(ABR_DEMO_DATA) --output-dir runs/demo/abr/evaluate
	$(PYTHON) -m abr.train_diffusion_abr --config configs/abr/smoke.yaml --data $(ABR_DEMO_DATA) --output-dir runs/demo/abr/diffusion
	$(PYTHON) -m abr.generate_abr --config configs/abr/smoke.yaml --checkpoint runs/demo/abr/diffusion --data $(ABR_DEMO_DATA) --output-dir runs/demo/abr/generate

abr-preprocess: setup
	$(PYTHON) -m abr.preprocess_abr --config $(ABR_CONFIG) --output-dir $(ABR_DATA) $(ARGS)

# the cache is rebuilt only when missing or older than its config file
$(ABR_DATA)/abr_cache.npz: $(ABR_CONFIG) | setup
	$(PYTHON) -m abr.preprocess_abr --config $(ABR_CONFIG) --output-dir $(ABR_DATA)

abr-train: setup $(ABR_DATA)/abr_cache.npz
	$(PYTHON) -m abr.train_abr --config $(ABR_CONFIG) --data $(ABR_DATA) --output-dir $(ABR_RUN) $(ARGS)

abr-validate: setup
	$(PYTHON) -m abr.validate_abr --config $(ABR_CONFIG) --checkpoint $(ABR_RUN) --data $(ABR_DATA) --output-dir runs/abr/validate/$(ABR_NAME) $(ARGS)

abr-bench: setup
	$(PYTHON) -m abr.benchmark_abr --config $(ABR_CONFIG) --checkpoint $(ABR_RUN) --data $(ABR_DATA) --output-dir runs/abr/bench/$(ABR_NAME) $(ARGS)

# new recordings (a file or a folder, any layout abr/readers.py reads) with the model of CONFIG
abr-predict: setup
	$(PYTHON) -m abr.predict_abr --config $(ABR_CONFIG) --data $(ABR_INPUT) --checkpoint $(ABR_RUN) --output-dir runs/abr/predict/$(ABR_NAME) $(ARGS)

abr-bench-exports: setup
	$(PYTHON) -m abr.benchmark_exports_abr --config $(ABR_CONFIG) --checkpoint $(ABR_RUN) --data $(ABR_DATA) --output-dir runs/abr/bench_exports/$(ABR_NAME) $(ARGS)

$(ABR_DIFFUSION_DATA)/abr_cache.npz: $(ABR_DIFFUSION_CONFIG) | setup
	$(PYTHON) -m abr.preprocess_abr --config $(ABR_DIFFUSION_CONFIG) --output-dir $(ABR_DIFFUSION_DATA)

abr-diffusion: setup $(ABR_DIFFUSION_DATA)/abr_cache.npz
	$(PYTHON) -m abr.train_diffusion_abr --config $(ABR_DIFFUSION_CONFIG) --data $(ABR_DIFFUSION_DATA) --output-dir runs/abr/diffusion/$(ABR_DIFFUSION_NAME) $(ARGS)

abr-generate: setup
	$(PYTHON) -m abr.generate_abr --config $(ABR_DIFFUSION_CONFIG) --checkpoint runs/abr/diffusion/$(ABR_DIFFUSION_NAME) --data $(ABR_DIFFUSION_DATA) --output-dir runs/abr/generate/$(ABR_DIFFUSION_NAME) $(ARGS)
