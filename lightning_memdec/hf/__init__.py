"""Hugging Face models: loading by name or path, the key layer and its capture hook, paired generation."""
