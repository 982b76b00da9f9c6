"""Data: tokenizers, indexed datasets, GPT and fine-tuning datasets, samplers."""
