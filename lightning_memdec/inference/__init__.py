"""Models that score and generate: base + Memory Decoder (InterpolatedLM), the kNN-LM, sliding-window scoring."""
