"""Evaluation: sampling, perplexity bounds, downstream benchmarks."""
