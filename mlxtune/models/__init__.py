"""Base models: where the weights come from, the tokenizer, the config's shapes, quantization."""
