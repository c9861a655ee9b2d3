"""Evaluation of generated samples: metrics (FID/IS, offline MNIST and toy metrics)."""
