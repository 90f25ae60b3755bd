# The LoRA / DoRA / MixLoRA / MixDoRA comparison (docs/results.md). Finished units are skipped and interrupted
# trainings resume, so every target here can be stopped and restarted at any time.
#   make experiment                               every unit of the grid, then the report
#   make experiment UNITS="multitask/mixlora base" THREADS=1
#   make curve                                    the learning curve's core units, two at a time, then the report
#   make curve-seeds curve-dora curve-dora-seeds  its further seeds and methods, the same way
#   make curve-probe                              time a few steps per method (the plan in docs/results.md)
#   make experiment-gpu                           the multitask_10x units (minutes each on a GPU)
# `make serve-check`: the export in vLLM and llama.cpp against `loramix generate` (benchmarks/serve_check.sh).
PYTHON ?= python
UNITS ?=
THREADS ?=
JOBS ?= 2

.PHONY: experiment experiment-data experiment-run experiment-report experiment-gpu curve curve-seeds curve-dora \
	curve-dora-seeds curve-probe serve-check

experiment: experiment-data experiment-run experiment-report

experiment-data:
	$(PYTHON) -m experiments.run prepare

experiment-run:
	$(PYTHON) -m experiments.run run $(foreach u,$(UNITS),--only $(u)) $(if $(THREADS),--threads $(THREADS))

experiment-report:
	$(PYTHON) -m experiments.run report

experiment-gpu: experiment-data
	$(PYTHON) -m experiments.run run --only 'multitask_10x/*'
	$(PYTHON) -m experiments.run report

# curve = the group curve-core; the other targets are the groups of the same name (experiments/run.py CURVE_GROUPS)
curve: GROUP = curve-core
curve-seeds curve-dora curve-dora-seeds: GROUP = $@
curve curve-seeds curve-dora curve-dora-seeds: experiment-data
	$(PYTHON) -m experiments.run run --jobs $(JOBS) --threads $(or $(THREADS),1) --only $(GROUP)
	$(PYTHON) -m experiments.run report

curve-probe: experiment-data
	$(PYTHON) -m experiments.run probe --threads 1 --steps 6 \
		--only curve_840/lora --only curve_840/mixlora --only curve_840/dora --only curve_840/mixdora

serve-check:
	PYTHON=$(PYTHON) bash benchmarks/serve_check.sh
