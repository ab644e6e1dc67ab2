"""Batch jobs on the inference engine: evaluate, suppress, segment, ablate and the demo, on one runner."""
