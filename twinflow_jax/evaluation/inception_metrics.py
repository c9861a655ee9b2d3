"""FID, Inception Score and precision/recall of generated images' Inception activations.

  acts = ActivationExtractor(load_inception(path), mesh=mesh)(samples)
  ref = load_reference('ref.npz')
  inception_metrics(acts, ref)   # {'fid': ..., 'inception_score': ..., 'precision': ...,
                                 #  'recall': ...}
"""

from __future__ import annotations

from collections.abc import Sequence

from twinflow_jax.evaluation.extractor import Activations
from twinflow_jax.evaluation.fid import frechet_distance, gaussian_stats
from twinflow_jax.evaluation.inception_score import ADM_SPLIT_SIZE, inception_score
from twinflow_jax.evaluation.precision_recall import DEFAULT_K, precision_recall
from twinflow_jax.evaluation.reference import ReferenceStats

METRICS = ('fid', 'inception_score', 'precision', 'recall')


def inception_metrics(acts: Activations, reference: ReferenceStats | None,
                      metrics: Sequence[str] = METRICS, *,
                      is_split_size: int = ADM_SPLIT_SIZE,
                      pr_k: int = DEFAULT_K) -> dict[str, float]:
  """Computes the requested metrics.

  Args:
    acts: Inception activations of the generated images (N >= 2 for FID).
    reference: statistics of the real data; needed for 'fid' (mu, sigma) and for
      'precision' / 'recall' (act).
    metrics: subset of METRICS.
    is_split_size: Inception Score split size (ADM: 5000).
    pr_k: neighbourhood size of precision / recall.

  Returns:
    {metric name: value}.
  """
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise ValueError(f'unknown metrics {unknown}; choose from {METRICS}')
  out = {}
  if 'fid' in metrics:
    if reference is None:
      raise ValueError("metric 'fid' needs reference statistics (mu, sigma)")
    stats = gaussian_stats(acts.pool)
    out['fid'] = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
  if 'inception_score' in metrics:
    out['inception_score'] = inception_score(acts.logits, is_split_size)
  if {'precision', 'recall'} & set(metrics):
    if reference is None or reference.act is None:
      raise ValueError('precision / recall need reference activations (`act` in the '
                       'reference .npz; fid_stats --keep-act M writes them)')
    pr = precision_recall(reference.act, acts.pool, k=pr_k)
    if 'precision' in metrics:
      out['precision'] = pr.precision
    if 'recall' in metrics:
      out['recall'] = pr.recall
  return out
