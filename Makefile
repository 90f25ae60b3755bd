# The LoRA / DoRA / MixLoRA / MixDoRA comparison (docs/results.md). Finished units are skipped and interrupted
# trainings resume, so `make experiment` can be stopped and restarted at any time.
#   make experiment                               every unit, then the report
#   make experiment UNITS="multitask/mixlora base" THREADS=1
# `make serve-check`: the export in vLLM and llama.cpp against `loramix generate` (benchmarks/serve_check.sh).
PYTHON ?= python
UNITS ?=
THREADS ?=

.PHONY: experiment experiment-data experiment-run experiment-report serve-check

experiment: experiment-data experiment-run experiment-report

experiment-data:
	$(PYTHON) -m experiments.run prepare

experiment-run:
	$(PYTHON) -m experiments.run run $(foreach u,$(UNITS),--only $(u)) $(if $(THREADS),--threads $(THREADS))

experiment-report:
	$(PYTHON) -m experiments.run report

serve-check:
	PYTHON=$(PYTHON) bash benchmarks/serve_check.sh
