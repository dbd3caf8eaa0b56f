# Strong-lens finding (lensing/). Every recipe line is one python command (sh and cmd.exe).
# Variables: CONFIG (a configs/lensing/*.yaml), DATA (a data set folder), CHECKPOINT (a checkpoint file, run
# folder or ensemble folder), RUN (a stopped run to continue), ARGS. Data sets live under data/, runs under runs/.
DEMO_TARGETS += lensing-demo
.PHONY: lensing-demo lensing-data lensing-train lensing-resume lensing-validate lensing-bench lensing-test

lensing-demo: setup
	$(PYTHON) -m lensing.preprocess_lensing simulate --config configs/lensing/demo.yaml --output-dir data/lensing/demo
	$(PYTHON) -m lensing.train_lensing --config configs/lensing/demo.yaml --data data/lensing/demo --output-dir runs/demo/lensing/train
	$(PYTHON) -m lensing.validate_lensing --config configs/lensing/demo.yaml --checkpoint runs/demo/lensing/train --data data/lensing/demo --output-dir runs/demo/lensing/validate
	$(PYTHON) -m lensing.benchmark_lensing --config configs/lensing/demo.yaml --output-dir runs/demo/lensing/benchmark --set benchmark.validate_summary=runs/demo/lensing/validate/summary.json

lensing-data: setup
	$(PYTHON) -m lensing.preprocess_lensing simulate --config $(or $(CONFIG),configs/lensing/baseline.yaml) --output-dir $(or $(DATA),data/lensing/space) $(ARGS)

lensing-train: setup
	$(PYTHON) -m lensing.train_lensing --config $(or $(CONFIG),configs/lensing/baseline.yaml) --data $(or $(DATA),data/lensing/space) $(ARGS)

lensing-resume: setup
	$(PYTHON) -m lensing.train_lensing --config $(or $(CONFIG),configs/lensing/baseline.yaml) --data $(or $(DATA),data/lensing/space) --resume $(RUN) $(ARGS)

lensing-validate: setup
	$(PYTHON) -m lensing.validate_lensing --config $(or $(CONFIG),configs/lensing/baseline.yaml) --checkpoint $(or $(CHECKPOINT),runs/demo/lensing/train) --data $(or $(DATA),data/lensing/demo) $(ARGS)

lensing-bench: setup
	$(PYTHON) -m lensing.benchmark_lensing --config $(or $(CONFIG),configs/lensing/benchmark.yaml) $(ARGS)

lensing-test: setup
	$(PYTHON) -m pytest tests/lensing -q
