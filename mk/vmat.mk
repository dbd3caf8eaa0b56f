# VMAT dose prediction (vmat/README.md). Every recipe line is one python command (sh and cmd.exe).
# Own data: make vmat-preprocess VMAT_RAW=data/vmat/raw [CONFIG=configs/vmat/site_lung.yaml], then
# make vmat-train CONFIG=configs/vmat/grad_loss.yaml.
# vmat-predict / vmat-validate default to the demo's model and test cases (run make vmat-demo first);
# for your own: make vmat-predict VMAT_RUN=runs/vmat/<config>/<timestamp> VMAT_TEST_DATA=data/vmat/npz_test
VMAT_RAW ?= data/vmat/raw
VMAT_DATA ?= data/vmat/npz
VMAT_DEMO := runs/demo/vmat
VMAT_RUN ?= $(VMAT_DEMO)/train
VMAT_TEST_DATA ?= $(VMAT_DEMO)/npz_test
VMAT_PRED ?= runs/vmat/predictions

DEMO_TARGETS += vmat-demo
.PHONY: vmat-demo vmat-preprocess vmat-train vmat-predict vmat-validate vmat-bench

# Synthetic patients (train + independent test) -> preprocessing -> smoke training -> prediction -> validation.
vmat-demo: setup
	$(PYTHON) -m vmat.phantom --config configs/vmat/phantom_smoke.yaml --output-dir $(VMAT_DEMO)/raw_train --n-cases 8 --seed 0
	$(PYTHON) -m vmat.phantom --config configs/vmat/phantom_smoke.yaml --output-dir $(VMAT_DEMO)/raw_test --n-cases 3 --seed 1 --set phantom.case_prefix=test
	$(PYTHON) vmat/preprocess_vmat.py --config configs/vmat/preprocess.yaml --data $(VMAT_DEMO)/raw_train --output-dir $(VMAT_DEMO)/npz_train
	$(PYTHON) vmat/preprocess_vmat.py --config configs/vmat/preprocess.yaml --data $(VMAT_DEMO)/raw_test --output-dir $(VMAT_DEMO)/npz_test
	$(PYTHON) vmat/train_vmat.py --config configs/vmat/smoke.yaml --data $(VMAT_DEMO)/npz_train --output-dir $(VMAT_DEMO)/train
	$(PYTHON) vmat/predict_vmat.py --checkpoint $(VMAT_DEMO)/train --data $(VMAT_DEMO)/npz_test --output-dir $(VMAT_DEMO)/predictions
	$(PYTHON) vmat/validate_vmat.py --config configs/vmat/validate_smoke.yaml --data $(VMAT_DEMO)/npz_test --predictions $(VMAT_DEMO)/predictions --atlas $(VMAT_DEMO)/train/atlas.json --output-dir $(VMAT_DEMO)/validate

vmat-preprocess: setup
	$(PYTHON) vmat/preprocess_vmat.py --config $(or $(CONFIG),configs/vmat/preprocess.yaml) --data $(VMAT_RAW) --output-dir $(VMAT_DATA) $(ARGS)

vmat-train: setup
	$(PYTHON) vmat/train_vmat.py --config $(or $(CONFIG),configs/vmat/baseline_unet.yaml) --data $(VMAT_DATA) $(ARGS)

vmat-predict: setup
	$(PYTHON) vmat/predict_vmat.py --checkpoint $(VMAT_RUN) --data $(VMAT_TEST_DATA) --output-dir $(VMAT_PRED) $(ARGS)

vmat-validate: setup
	$(PYTHON) vmat/validate_vmat.py --data $(VMAT_TEST_DATA) --predictions $(VMAT_PRED) $(ARGS)

vmat-bench: setup
	$(PYTHON) vmat/benchmark_vmat.py --output-dir runs/vmat/bench $(ARGS)
