r"""Command-line entry point of the trainer.

  python -m twinflow_jax.main --config configs/default.py --workdir /tmp/mnist \
      [--config.optim.lr=2e-4 ...] [--distributed=auto|on|off]

Rerunning the same command resumes from the newest verified checkpoint in --workdir. On
a TPU pod or a multi-node GPU job, run the same command on every process (see launch/).
Without a cluster environment that JAX detects (SLURM, Open MPI, Cloud TPU), give every
process --coordinator_address=HOST:PORT (or JAX_COORDINATOR_ADDRESS), --num_processes=N
and its --process_id=I.

Exit status: 0 done or stopped by SIGTERM with a checkpoint; 2 a user mistake (config,
flags, paths, data), printed as one line `error: ...`; 3 a fault that stopped the run
(failed save, too many non-finite steps, no verifiable checkpoint), also one line, with
every complete checkpoint kept; 1 an internal error (with its traceback).
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from twinflow_jax import errors
from twinflow_jax import hostmem

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py, optionally FILE:ARG); override "
    "fields with --config.<section>.<field>=value (tuples as '(1, 2)').", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, samples and TensorBoard "
    "events; an existing run there is resumed.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'on' always (TPU pods, multi-node GPU), 'auto' "
    "when a cluster environment (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS, multi-host "
    "TPU) is detected or --num_processes > 1, 'off' never (the wrapper already did it, or "
    "single process).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordination service, for "
    "clusters JAX does not detect (default: $JAX_COORDINATOR_ADDRESS or detection).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes, with --coordinator_address.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes), with "
    "--coordinator_address.", lower_bound=0)

# OS errors that mean the storage failed (full, over quota, read-only, I/O error).
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)

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


def maybe_initialize_distributed(mode: str, coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Runs `jax.distributed.initialize()` per --distributed, before any JAX computation."""
  explicit = num_processes is not None and num_processes > 1
  if mode == "off" or (mode == "auto" and not explicit and not _cluster_detected()):
    return
  if explicit and (process_id is None or not 0 <= process_id < num_processes):
    raise errors.UserError(f"--process_id must lie in [0, {num_processes}) with "
                           f"--num_processes={num_processes}, got {process_id}")
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except ValueError as e:   # e.g. no coordinator address and no cluster JAX detects
    raise errors.UserError(
        f"--distributed={mode}: jax.distributed.initialize() failed ({errors.one_line(e)}); "
        "outside a cluster JAX detects (SLURM, Open MPI, Cloud TPU) give "
        "--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I, or use "
        "--distributed=off for one process") from e
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def _config_path(argv: list[str]) -> str:
  """The value of --config in `argv` (for messages), or '?'."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


def _unknown_field(error: BaseException, argv: list[str]) -> str | None:
  """The one-line message for an override of a config field that does not exist, or None.

  ml_collections raises AttributeError("'num_step'\nDid you mean ...") while applying
  --config.train.num_step=5; this names the flag instead of blaming the config file.
  """
  if not isinstance(error, (AttributeError, KeyError)) or not any(
      "config_flags" in f.filename for f in traceback.extract_tb(error.__traceback__)):
    return None
  inner = error.args[0] if error.args else error
  if isinstance(inner, KeyError) and inner.args:
    inner = inner.args[0]
  text = str(inner).replace("\\n", "\n")
  first, _, hint = text.strip("'\"").partition("\n")
  key = first.strip("'\"")
  names = [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]
  hits = [n for n in names if key in n.split(".")[1:]]
  if not hits:
    return None
  hint = f" ({hint.strip()})" if hint.strip() else ""
  return (f"unknown config field --{hits[0]}{hint}; the fields of each section are listed "
          "in docs/configs.md")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config files that fail to load reported in one line."""
  path = _config_path(argv).split(":", 1)[0]
  if path != "?" and not os.path.isfile(path):
    sys.stderr.write(f"error: config file {path} not found (--config); the shipped ones are "
                     "in configs/, e.g. --config configs/default.py\n")
    sys.exit(errors.EXIT_USER_ERROR)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if "Error whilst parsing config file" in str(e):
      # The config file's get_config() raised: absl embeds the traceback in the message.
      lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
      sys.stderr.write(f"error: cannot load config file {path}: {lines[-1]}\n")
      sys.exit(errors.EXIT_USER_ERROR)
    sys.stderr.write(f"FATAL Flags parsing error: {errors.one_line(e)}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except  (the config file's own code)
    unknown = _unknown_field(e, argv)
    if unknown:
      message = unknown
    elif isinstance(e, AttributeError) and "get_config" in str(e):
      message = (f"config file {path} defines no get_config(); a config file must define "
                 "get_config() returning an ml_collections.ConfigDict (see configs/)")
    else:
      frames = [f for f in traceback.extract_tb(e.__traceback__)
                if os.path.abspath(f.filename) == os.path.abspath(path)]
      where = f" line {frames[-1].lineno}" if frames else ""
      message = (f"cannot load config file {path}{where}: {type(e).__name__}: "
                 f"{errors.one_line(e)}")
    sys.stderr.write(f"error: {message}\n")
    sys.exit(errors.EXIT_USER_ERROR)


class _NoLibraryTracebacks(std_logging.Filter):
  """Keeps the message of Orbax's error logs but drops their tracebacks.

  A failed background save is logged by Orbax with its traceback from several threads;
  the trainer reports the same failure as one line (path and OS error) and exits.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" in record.pathname and record.exc_info:
      error = record.exc_info[1]
      why = f" ({type(error).__name__}: {errors.one_line(error)})" if error else ""
      record.msg = f"{record.getMessage()}{why}"
      record.args, record.exc_info, record.exc_text = None, None, None
    return True


def run(config, workdir: str) -> None:
  """Trains; user mistakes and run faults end in one line and exit status 2 / 3."""
  try:
    from twinflow_jax.train import loop  # pylint: disable=g-import-not-at-top
    result = loop.train(config, workdir)
  except errors.UserError as e:
    _fail(e, errors.EXIT_USER_ERROR)
  except errors.RunError as e:
    _fail(e, errors.EXIT_RUN_ERROR)
  except OSError as e:
    if e.errno not in _STORAGE_ERRNOS:
      raise
    # A full or failing disk while writing logs, metrics or samples: a fault, not a bug.
    _fail(errors.RunError(f"writing to {workdir} failed: {errors.one_line(e)}; the "
                          f"complete checkpoints are kept. Free space or fix the storage "
                          f"and rerun the same command to resume"), errors.EXIT_RUN_ERROR)
  logging.info("finished at step %d%s", result.step,
               f" (stopped: {result.stopped})" if result.stopped else "")


def _fail(error: BaseException, status: int) -> None:
  logging.flush()
  sys.stderr.write(f"error: {errors.one_line(error)}\n")
  sys.stderr.flush()
  # Skip interpreter teardown: with several processes a peer may still wait for us in a
  # collective, and JAX's shutdown barrier would then hang instead of exiting.
  os._exit(status)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/default.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  # Before JAX starts its backends: their plugin probe logs at INFO ("Unable to initialize
  # backend 'tpu' ... libtpu.so") is hidden, and one line names the backend in use instead.
  from twinflow_jax.train import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  logging.get_absl_handler().addFilter(_NoLibraryTracebacks())
  try:
    maybe_initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                 _NUM_PROCESSES.value, _PROCESS_ID.value)
  except errors.UserError as e:
    _fail(e, errors.EXIT_USER_ERROR)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # only process 0 reports progress
  logging.info(metrics.backend_line())
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  hostmem.reexec_with_resident_malloc()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
