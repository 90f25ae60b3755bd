"""The LoRA / DoRA / MixLoRA / MixDoRA comparison on SmolLM2-135M-Instruct (issue 7): data, runner, report."""
