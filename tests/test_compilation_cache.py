"""The persistent XLA compilation cache is on by default, in <workdir>/xla_cache."""

import collections
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_train_loop  # noqa: E402  pylint: disable=g-import-not-at-top

from twinflow_jax.train import loop  # noqa: E402


@pytest.fixture
def cache_events():
  counts = collections.Counter()
  listener = lambda event, **kwargs: counts.update([event])
  jax.monitoring.register_event_listener(listener)
  yield counts
  jax.monitoring.unregister_event_listener(listener)
  loop.enable_compilation_cache(None)   # leave the process as we found it


@pytest.mark.slow
def test_resumed_run_reads_its_compiled_step_from_the_workdir(tmp_path, cache_events):
  workdir = str(tmp_path / "run")
  config = test_train_loop.toy_config(**{"train.compilation_cache_dir": "",
                                         "train.num_steps": 4, "train.checkpoint_every": 2})
  loop.train(config, workdir, stop_at_step=3)          # checkpoint at step 2
  cache = os.path.join(workdir, "xla_cache")
  assert jax.config.jax_compilation_cache_dir == cache
  assert [f for f in os.listdir(cache) if f.endswith("-cache")], os.listdir(cache)
  hits = cache_events["/jax/compilation_cache/cache_hits"]
  result = loop.train(config, workdir)                 # resumes at step 2
  assert result.resumed_from == 2 and result.step == 4
  assert cache_events["/jax/compilation_cache/cache_hits"] > hits
