"""Flat views of nested parameter dicts (paths are tuples of keys)."""

from typing import Any


def flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
  """Nested dict -> {path tuple: leaf}."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def unflatten(flat: dict[tuple, Any]) -> dict[Any, Any]:
  """{path tuple: leaf} -> nested dict."""
  out = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def path_name(path: tuple) -> str:
  """('blocks', 0, 'mlp') -> 'blocks/0/mlp'."""
  return '/'.join(map(str, path))
