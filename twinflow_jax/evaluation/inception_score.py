"""Inception Score (Salimans et al. 2016) as the ADM evaluation suite computes it.

  IS = exp( E_x KL( p(y | x) || p(y) ) ),  p(y) = mean_x p(y | x),

with p(y | x) = softmax over all 1008 outputs of the unbiased logits pool_3 @ W (no fc
bias; `InceptionOutput.logits_unbiased`), as openai/improved-gan and the ADM suite do.
The samples are cut into consecutive splits of `split_size` (ADM: 5000; a last, shorter
split is scored too), each split is scored on its own marginal p(y), and the score is the
mean over splits. Computed in float64 from log-softmax, so saturated softmaxes give no
log(0).
"""

from __future__ import annotations

import numpy as np

ADM_SPLIT_SIZE = 5000


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score_per_split(logits: np.ndarray, split_size: int = ADM_SPLIT_SIZE
                              ) -> np.ndarray:
  """Per-split scores of logits [N, K] (N >= 1): float64 [ceil(N / split_size)]."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or not len(logits):
    raise ValueError(f'expected logits [N >= 1, K], got shape {logits.shape}')
  if split_size < 1:
    raise ValueError(f'split_size must be >= 1, got {split_size}')
  scores = []
  for start in range(0, len(logits), split_size):
    logp = _log_softmax(logits[start:start + split_size])
    p = np.exp(logp)
    # log of the split's mean p(y), as a log-sum-exp: finite even where p underflows.
    m = logp.max(axis=0)
    log_marginal = m + np.log(np.exp(logp - m).sum(axis=0)) - np.log(len(logp))
    kl = np.sum(p * (logp - log_marginal[None]), axis=1)
    scores.append(np.exp(kl.mean()))
  return np.array(scores)


def inception_score(logits: np.ndarray, split_size: int = ADM_SPLIT_SIZE) -> float:
  """Inception Score of unbiased Inception logits [N, 1008] (mean over splits).

  Ranges from 1 (every sample gets the same class distribution) to K (confident and
  evenly spread over K classes).
  """
  return float(inception_score_per_split(logits, split_size).mean())
