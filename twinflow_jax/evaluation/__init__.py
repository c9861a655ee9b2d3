"""Evaluation of generated samples for twinflow_jax.

Inception metrics (FID, Inception Score, improved precision/recall) with the FID
InceptionV3 of `twinflow_jax.models.inception`; see docs/evaluation.md.

  preprocess         samples -> uint8 -> Inception input (ADM suite or pytorch-fid).
  extractor          `ActivationExtractor`: jitted, sharded over the mesh, gathered.
  fid                Frechet distance (float64, symmetric eigen route), Gaussian stats.
  inception_score    Inception Score (ADM: splits of 5000, unbiased 1008-way logits).
  precision_recall   Kynkaanniemi et al. 2019, k = 3, blockwise distances in JAX.
  reference          reference statistics .npz (ADM reference-batch compatible).
  inception_metrics  all of the above from activations + reference.
  image_sources      arrays, .npz streams, folders, data configs as image sets.
  fid_stats          `python -m twinflow_jax.evaluation.fid_stats`: reference statistics.
  sample_metrics     metrics of a sample set (class accuracy, diversity) for a run.
  mnist, toy         offline MNIST classifier metrics; 2-D toy metrics.

Importing this package imports numpy only; import the modules you need.
"""
