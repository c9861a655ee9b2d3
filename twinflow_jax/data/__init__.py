"""Training data for twinflow_jax, delivered through Grain.

Entry points for the trainer:
  `default_config()`: the `config.data` section (every field documented there).
  `get_data_spec(config.data)`: example shape, classes / text shapes, before reading.
  `create_train_iterator(config.data, global_batch_size=..., seed=...)`: checkpointable
    Grain iterator of per-process numpy batches.
  `make_global_batch(batch, mesh)`: per-process batch -> global sharded jax.Arrays.
  `process_rows(sharding, global_batch_size)`: the global rows this process loads.

Importing this package does not import TensorFlow or tensorflow_datasets (TFDS is
imported lazily, only for the 'tfds' source).
"""

from twinflow_jax.data.config import DataSpec
from twinflow_jax.data.config import default_config
from twinflow_jax.data.config import get_data_spec
from twinflow_jax.data.config import SOURCES
from twinflow_jax.data.config import validate_config
from twinflow_jax.data.pipeline import create_train_iterator
from twinflow_jax.data.pipeline import make_global_batch
from twinflow_jax.data.pipeline import process_rows
from twinflow_jax.data.toy2d import sample_toy2d
from twinflow_jax.data.toy2d import TOY2D_NAMES

__all__ = [
    "DataSpec",
    "SOURCES",
    "TOY2D_NAMES",
    "create_train_iterator",
    "default_config",
    "get_data_spec",
    "make_global_batch",
    "process_rows",
    "sample_toy2d",
    "validate_config",
]
