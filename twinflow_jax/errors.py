"""The two kinds of errors that end a command with one line instead of a traceback.

`UserError`: a mistake the user can fix (a config field, a flag, a path, the data). The
message names the field, file or value and says what to do. Commands print it as
`error: <message>` and exit with status 2.

`RunError`: a fault that stopped a run (a failed checkpoint save, steps that keep producing
non-finite values, no checkpoint that passes verification). The message names the step,
path or OS error; every complete checkpoint is kept. Commands print it and exit with 3.

Anything else is an internal error and keeps its traceback (exit status 1). Both classes
carry the original exception as `__cause__` for programmatic callers.

The subclasses also derive from the built-in type the code raised before (ValueError,
FileNotFoundError), so `except ValueError` keeps working.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

EXIT_USER_ERROR = 2
EXIT_RUN_ERROR = 3


class UserError(Exception):
  """A mistake in the config, flags, paths or data; the message says what to change."""


class ConfigError(UserError, ValueError):
  """An invalid or inconsistent config value."""


class DataError(UserError, ValueError):
  """Data that cannot be read or does not match the config (names the file)."""


class PathError(UserError, FileNotFoundError):
  """A file or folder that is missing or of the wrong kind (names the path)."""


class RunError(Exception):
  """A fault that stopped training; complete checkpoints were kept."""


class CheckpointSaveError(RunError):
  """An (asynchronous) checkpoint save failed; names the path and the OS error."""


class CheckpointRestoreError(RunError):
  """No checkpoint could be restored and verified; nothing was moved."""


class NonFiniteError(RunError):
  """Too many consecutive skipped steps, or a non-finite state about to be saved."""


@contextlib.contextmanager
def as_config_errors(what: str = "") -> Iterator[None]:
  """Re-raises ValueError / FileNotFoundError from config-derived work as user errors.

  Used around code that only turns config values into objects (validation, mesh,
  optimizer, model shapes, opening data): a ValueError raised there is about the config.

  Args:
    what: optional prefix of the message, e.g. 'config.data'.
  """
  prefix = f"{what}: " if what else ""
  try:
    yield
  except UserError:
    raise
  except FileNotFoundError as e:
    raise PathError(f"{prefix}{e}") from e
  except ValueError as e:
    raise ConfigError(f"{prefix}{e}") from e


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (newlines of multi-line messages become '; ')."""
  text = str(error).strip() or type(error).__name__
  # TensorStore appends its whole store spec (dozens of lines) to read errors: drop it.
  text = text.split(" See full TensorStore details:")[0]
  return "; ".join(line.strip() for line in text.splitlines() if line.strip())
