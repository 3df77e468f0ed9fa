"""Perplexity, latency and downstream evaluation, and their reports."""
