# ASL: CBF/ATT from multi-PLD PCASL/VSASL (asl/README.md). Every recipe line is one python command.
# Data live under data/ (never runs/, which `make clean` deletes): the smoke sets in data/asl/smoke.
ASL_DEMO := runs/demo/asl
ASL_DATA ?= data/asl/smoke
ASL_RUN ?= $(ASL_DEMO)/train
ASL_SMOKE := configs/asl/smoke.yaml
ASL_PROTOCOL_SMOKE := configs/asl/protocol_smoke.yaml

DEMO_TARGETS += asl-demo asl-protocol-demo
.PHONY: asl-demo asl-protocol-demo asl-preprocess asl-train asl-protocol-train asl-protocol-calibrate asl-validate asl-bench asl-predict asl-fit

asl-demo: setup
	$(PYTHON) -m asl.preprocess_asl --config $(ASL_SMOKE) --data $(ASL_DATA)
	$(PYTHON) -m asl.train_asl --config $(ASL_SMOKE) --data $(ASL_DATA) --output-dir $(ASL_DEMO)/train
	$(PYTHON) -m asl.validate_asl --checkpoint $(ASL_DEMO)/train --config $(ASL_SMOKE) --data $(ASL_DATA) --output-dir $(ASL_DEMO)/validate
	$(PYTHON) -m asl.predict_asl $(ASL_DATA)/synthetic_subject/bids --method ls --config $(ASL_SMOKE) --set physics.pcasl_model=blood_t1 --reference-cbf $(ASL_DATA)/synthetic_subject/truth_cbf.nii.gz --reference-att $(ASL_DATA)/synthetic_subject/truth_att.nii.gz --output-dir $(ASL_DEMO)/predict_ls
	$(PYTHON) -m asl.predict_asl $(ASL_DATA)/synthetic_subject/bids --checkpoint $(ASL_DEMO)/train --config $(ASL_SMOKE) --set physics.pcasl_model=blood_t1 --reference-cbf $(ASL_DATA)/synthetic_subject/truth_cbf.nii.gz --reference-att $(ASL_DATA)/synthetic_subject/truth_att.nii.gz --output-dir $(ASL_DEMO)/predict
	$(PYTHON) -m asl.benchmark_asl --checkpoint $(ASL_DEMO)/train --config $(ASL_SMOKE) --data $(ASL_DATA) --output-dir $(ASL_DEMO)/benchmark

# Protocol-conditioned network (train_protocol_asl.py) at smoke size: train, validate on held-out brain subjects
# against least squares, and time it as predict runs it (18-58 s measured on one loaded CPU core).
asl-protocol-demo: setup
	$(PYTHON) -m asl.train_protocol_asl --config $(ASL_PROTOCOL_SMOKE) --output-dir $(ASL_DEMO)/protocol_train
	$(PYTHON) -m asl.validate_asl --checkpoint $(ASL_DEMO)/protocol_train --config $(ASL_PROTOCOL_SMOKE) --output-dir $(ASL_DEMO)/protocol_validate
	$(PYTHON) -m asl.benchmark_asl --checkpoint $(ASL_DEMO)/protocol_train --config $(ASL_PROTOCOL_SMOKE) --output-dir $(ASL_DEMO)/protocol_benchmark

asl-protocol-train: setup
	$(PYTHON) -m asl.train_protocol_asl --config $(or $(CONFIG),configs/asl/protocol_pcasl.yaml) $(ARGS)

# σ scale (Laves et al. 2020) of an existing protocol-conditioned checkpoint, written to a new folder (no training):
# make asl-protocol-calibrate ASL_RUN=runs/asl/protocol_pcasl ARGS="--output-dir runs/asl/protocol_pcasl_cal"
asl-protocol-calibrate: setup
	$(PYTHON) -m asl.train_protocol_asl --calibrate $(ASL_RUN) --config $(or $(CONFIG),configs/asl/protocol_pcasl.yaml) $(ARGS)

asl-preprocess: setup
	$(PYTHON) -m asl.preprocess_asl --config $(or $(CONFIG),configs/asl/production_v2.yaml) $(ARGS)

asl-train: setup
	$(PYTHON) -m asl.preprocess_asl --config $(or $(CONFIG),configs/asl/production_v2.yaml)
	$(PYTHON) -m asl.train_asl --config $(or $(CONFIG),configs/asl/production_v2.yaml) $(ARGS)

asl-validate: setup
	$(PYTHON) -m asl.validate_asl --checkpoint $(ASL_RUN) --config $(or $(CONFIG),$(ASL_SMOKE)) $(ARGS)

asl-bench: setup
	$(PYTHON) -m asl.benchmark_asl --checkpoint $(ASL_RUN) --config $(or $(CONFIG),$(ASL_SMOKE)) $(ARGS)

asl-predict: setup
	$(PYTHON) -m asl.predict_asl $(or $(INPUT),$(ASL_DATA)/synthetic_subject/bids) --checkpoint $(ASL_RUN) --config $(or $(CONFIG),$(ASL_SMOKE)) $(ARGS)

asl-fit: setup
	$(PYTHON) -m asl.predict_asl $(INPUT) --method ls $(ARGS)
