r"""Command-line entry point of the trainer.

  python -m twinflow_jax.main --config configs/default.py --workdir /tmp/mnist \
      [--config.optim.lr=2e-4 ...] [--distributed=auto|on|off]

Rerunning the same command resumes from the newest checkpoint in --workdir. On a TPU pod
or a multi-node GPU job, run the same command on every process (see launch/).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override fields with "
    "--config.<section>.<field>=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, samples and TensorBoard "
    "events; an existing run there is resumed.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'on' always (TPU pods, multi-node GPU), 'auto' "
    "when a cluster environment (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS, multi-host "
    "TPU) is detected, 'off' never (the wrapper already did it, or single process).")

# Environment variables that mean "one of several processes" (see jax._src.clusters).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "OMPI_MCA_orte_hnp_uri",
                "MEGASCALE_COORDINATOR_ADDRESS")


def _cluster_detected() -> bool:
  if any(os.environ.get(v) for v in _CLUSTER_ENV):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def maybe_initialize_distributed(mode: str) -> None:
  """Runs `jax.distributed.initialize()` per --distributed, before any JAX computation."""
  if mode == "off" or (mode == "auto" and not _cluster_detected()):
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize()
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/default.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  maybe_initialize_distributed(_DISTRIBUTED.value)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # only process 0 reports progress
  from twinflow_jax.train import loop  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  result = loop.train(_CONFIG.value, _WORKDIR.value)
  logging.info("finished at step %d%s", result.step,
               f" (stopped: {result.stopped})" if result.stopped else "")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
