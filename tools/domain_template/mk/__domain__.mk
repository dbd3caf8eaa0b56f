# __domain__ (started from tools/domain_template). One python command per recipe line (sh and cmd.exe).
DEMO_TARGETS += __domain__-demo
.PHONY: __domain__-demo

__domain__-demo: setup
	$(PYTHON) -m __domain__.preprocess___domain__ --config configs/__domain__/smoke.yaml --output-dir data/demo/__domain__
	$(PYTHON) -m __domain__.train___domain__ --config configs/__domain__/smoke.yaml --data data/demo/__domain__ --output-dir runs/demo/__domain__/train
	$(PYTHON) -m __domain__.validate___domain__ --config configs/__domain__/smoke.yaml --data data/demo/__domain__ --checkpoint runs/demo/__domain__/train --output-dir runs/demo/__domain__/validate
