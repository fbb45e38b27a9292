"""Command-line helpers shared by the absl mains (launch, compare, plot, benchmark).

`parse_flags` turns flag mistakes (an unknown `--config.a.b` key, a missing config file)
into one FATAL line, and quiets library logs unless `--verbosity` asks for them.
"""

import importlib
import logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from fedmerge_jax import config as config_lib

# Their INFO lines narrate every checkpoint write, file read and dataset preparation.
CHATTY_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/jax/", "/etils/")
# Said on every CPU run by JAX's backend probe; true, and useless.
NOISE = ("libtpu", "Unable to initialize backend 'tpu'")


def fatal(message: str) -> None:
  """Exits with one line, `FATAL <message>`, and no traceback."""
  sys.exit(f"FATAL {message}")


def _config_override_paths(argv):
  """The dotted keys of every `--config.<key>[=value]` in `argv`."""
  for arg in argv[1:]:
    match = re.match(r"--config\.([^=\s]+)", arg)
    if match:
      yield match.group(1)


def _unknown_override(argv):
  schema = dict(config_lib.flatten(config_lib.base_config()))
  return next((p for p in _config_override_paths(argv) if p not in schema), None)


flags.DEFINE_list(
  "imports",
  [],
  "Comma-separated Python modules imported before the config and "
  "flags are checked, e.g. my_models: where they call "
  "fedmerge_jax.models.register_model / algorithms.register_algorithm.",
)


def import_user_modules(argv) -> None:
  """Imports the modules --imports names in `argv` (the current folder is searched too), so
  that what they register is known when flags and the config are validated."""
  names = []
  for i, arg in enumerate(argv):
    if arg.startswith("--imports="):
      names += arg.split("=", 1)[1].split(",")
    elif arg == "--imports" and i + 1 < len(argv):
      names += argv[i + 1].split(",")
  if names and os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  for name in filter(None, (n.strip() for n in names)):
    try:
      importlib.import_module(name)
    except ImportError as e:
      sys.exit(
        f"FATAL --imports={name}: cannot import it ({e}). Give a module name (no .py), "
        "run from the folder that holds it, or add that folder to PYTHONPATH."
      )


def parse_flags(argv):
  """absl's parsing; every mistake a user can make on the command line is one FATAL line.

  Modules named by --imports are imported first, so that what they register validates.
  """
  import_user_modules(argv)
  try:
    rest = app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    unknown = _unknown_override(argv)
    if unknown is not None:
      message = config_lib.unknown_key_message(unknown)
      fatal(
        f"Flags parsing error: {message[0].lower()}{message[1:]} Every valid key, "
        "with its meaning, is listed in fedmerge_jax/config.py."
      )
    message = str(e).strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
    fatal(f"Flags parsing error: {message}")
  _check_config_file()
  quiet_library_logs()
  return rest


def _check_config_file() -> None:
  """A --config file that does not exist or fails to load: one line, not two tracebacks."""
  if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
    return
  holder = flags.FLAGS["config"]
  path = getattr(holder, "config_filename", None) or str(holder.serialize()).split("=", 1)[-1]
  path = path.split(":", 1)[0]
  try:
    flags.FLAGS.config.keys()  # A config that failed to load raises here.
  except OSError as e:
    if not os.path.isfile(path):
      fatal(
        f"--config={path}: no such file (looked in {os.getcwd()}). Give a config file's "
        "path, e.g. --config=configs/default.py."
      )
    cause = e.__cause__ or e
    fatal(f"--config={path} failed to load ({type(cause).__name__}: {cause}).")


def check_workdir(workdir: str) -> None:
  """A --workdir that is an existing file cannot hold a run: say so before any work."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    fatal(
      f"--workdir={workdir} is a file, not a directory. Give a new or existing "
      "directory, e.g. --workdir=/tmp/fedmerge_run."
    )


def is_noise(record: logging.LogRecord) -> bool:
  """A library's INFO line, or JAX's libtpu probe at any level: not shown by default."""
  if any(noise in str(record.msg) for noise in NOISE):
    return True
  if record.exc_info and record.exc_info[0] is KeyboardInterrupt:
    return True  # A library's own report of Ctrl-C; the main says it in one line.
  return record.levelno < logging.WARNING and any(
    part in record.pathname for part in CHATTY_LIBRARIES
  )


def _drop_noise(record: logging.LogRecord) -> bool:
  return not is_noise(record)


def quiet_library_logs() -> None:
  """Keeps our INFO lines and everyone's warnings; drops library noise (`is_noise`).
  `--verbosity=1` (absl's flag) or more keeps everything."""
  if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
    return
  handler = absl_logging.get_absl_handler()
  if _drop_noise not in handler.filters:
    handler.addFilter(_drop_noise)
