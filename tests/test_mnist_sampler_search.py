"""The summary over sample sets of benchmarks/mnist_sampler_search.py."""

import importlib.util
import pathlib

import pytest

from twinflow_jax import sampling

_PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "mnist_sampler_search.py"
_spec = importlib.util.spec_from_file_location("mnist_sampler_search_benchmark", _PATH)
search = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(search)


def _set(rows):
  return {"rows": [{"sampler": name, "class_acc": acc, "fid": fid, "div_pixel_rel": div}
                   for name, acc, fid, div in rows]}


def test_summary_means_and_sets_no_worse_than_one_nfe():
  sets = [_set([("1nfe", 0.95, 5.0, 0.90), ("a", 0.96, 4.0, 0.88), ("b", 0.94, 6.0, 0.95)]),
          _set([("1nfe", 0.97, 4.0, 0.85), ("a", 0.97, 4.5, 0.86), ("b", 0.90, 3.0, 0.80)])]
  rows = {r["sampler"]: r for r in search.summarise(sets)}
  assert [r["sampler"] for r in search.summarise(sets)] == ["a", "1nfe", "b"]  # by accuracy
  a, b = rows["a"], rows["b"]
  assert a["class_acc"] == pytest.approx(0.965) and a["fid"] == pytest.approx(4.25)
  assert a["div_pixel_rel"] == pytest.approx(0.87) and a["div_pixel_rel_min"] == 0.86
  # Each set is judged against its own 1 NFE (ties count as no worse).
  assert (a["no_worse_acc"], a["no_worse_fid"], a["no_worse_div"]) == (2, 1, 1)
  assert (b["no_worse_acc"], b["no_worse_fid"], b["no_worse_div"]) == (0, 1, 1)
  assert rows["1nfe"]["no_worse_acc"] == rows["1nfe"]["sets"] == 2


def test_grid_points_equal_to_a_preset_carry_its_name():
  any4 = sampling.SamplerConfig(steps=4, stochastic_ratio=0.0, gaps=(0.001, 0.5), style="any")
  assert search.preset_name(any4) == "any4"
  assert search.preset_name(any4.replace(stochastic_ratio=0.25)) is None
