"""Evaluators of trained language models: held-out perplexity and bits per byte, multiple-choice
tasks scored by log-likelihood, and an lm-evaluation-harness adapter (`bigmodel eval`)."""
