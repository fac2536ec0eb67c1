"""Report writer family: a causal LM from the weight mirror with sensor and image prefix encoders,
instruction-tuned with LoRA (config, model, data, export, train and the tiny debug LM)."""
