# rsna_spine: RSNA 2024 lumbar spine degenerative grading (two-stage: localize, then grade).
# Each recipe line is one python command (sh and cmd.exe alike); see rsna_spine/README.md.

RSNA_DEMO := runs/demo/rsna_spine
RSNA_SMOKE := configs/rsna_spine/smoke.yaml
RSNA_CONFIG = $(or $(CONFIG),configs/rsna_spine/two_stage.yaml)

DEMO_TARGETS += rsna-demo
.PHONY: rsna-demo rsna-preprocess rsna-train rsna-validate rsna-predict rsna-kaggle rsna-bench

# synthetic Kaggle-layout dataset -> preprocess -> train both stages -> out-of-fold validation -> submission
rsna-demo: setup
	$(PYTHON) -m rsna_spine.preprocess_rsna --config $(RSNA_SMOKE) --output-dir $(RSNA_DEMO)/preprocess $(ARGS)
	$(PYTHON) -m rsna_spine.train_rsna --config $(RSNA_SMOKE) --output-dir $(RSNA_DEMO)/train $(ARGS)
	$(PYTHON) -m rsna_spine.validate_rsna --config $(RSNA_SMOKE) --checkpoint $(RSNA_DEMO)/train --output-dir $(RSNA_DEMO)/validate $(ARGS)
	$(PYTHON) -m rsna_spine.predict_rsna --config $(RSNA_SMOKE) --checkpoint $(RSNA_DEMO)/train --data $(RSNA_DEMO)/kaggle --solution $(RSNA_DEMO)/kaggle/solution/test_solution.csv --set predict.temperatures=$(RSNA_DEMO)/validate/temperatures.json --output-dir $(RSNA_DEMO)/predict $(ARGS)

rsna-preprocess: setup
	$(PYTHON) -m rsna_spine.preprocess_rsna --config $(RSNA_CONFIG) $(ARGS)

rsna-train: setup
	$(PYTHON) -m rsna_spine.train_rsna --config $(RSNA_CONFIG) $(ARGS)

rsna-validate: setup
	$(PYTHON) -m rsna_spine.validate_rsna --config $(RSNA_CONFIG) $(ARGS)

rsna-predict: setup
	$(PYTHON) -m rsna_spine.predict_rsna --config $(RSNA_CONFIG) $(ARGS)

# offline notebook-style inference from a model folder: make rsna-kaggle ARGS="--checkpoint MODEL_DIR --data KAGGLE_DIR"
rsna-kaggle: setup
	$(PYTHON) -m rsna_spine.predict_kaggle_rsna $(ARGS)

rsna-bench: setup
	$(PYTHON) -m rsna_spine.benchmark_rsna --config $(or $(CONFIG),$(RSNA_SMOKE)) $(ARGS)
