"""Evaluation: metrics, scoring an adapter, batched generation, the code sandbox."""
