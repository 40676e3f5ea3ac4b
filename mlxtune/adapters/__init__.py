"""Adapter methods, framework-free: LoRA/DoRA and prompt/prefix shapes, initial weights, files."""
