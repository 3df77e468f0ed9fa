"""The maths, defined once: p_kNN, gold log-probs, the λ mixture, perplexity, the sparse KL + CE loss, the
sparse-target kernels. Imports nothing else of the package."""
