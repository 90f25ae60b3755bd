# The LoRA / DoRA / MixLoRA / MixDoRA comparison (docs/results.md). Finished units are skipped and interrupted
# trainings resume, so `make experiment` can be stopped and restarted at any time.
#   make experiment                               every unit, then the report
#   make experiment UNITS="multitask/mixlora base" THREADS=1
PYTHON ?= python
UNITS ?=
THREADS ?=

.PHONY: experiment experiment-data experiment-run experiment-report

experiment: experiment-data experiment-run experiment-report

experiment-data:
	$(PYTHON) -m experiments.run prepare

experiment-run:
	$(PYTHON) -m experiments.run run $(foreach u,$(UNITS),--only $(u)) $(if $(THREADS),--threads $(THREADS))

experiment-report:
	$(PYTHON) -m experiments.run report
