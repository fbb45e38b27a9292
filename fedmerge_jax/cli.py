"""Command-line helpers shared by the absl mains (launch.py, python -m fedmerge_jax.compare)."""

import importlib
import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

CHATTY_LIBRARIES = ("/orbax/",)  # Their INFO lines narrate every checkpoint write.

flags.DEFINE_list("imports", [], "Comma-separated Python modules imported before the config and "
                  "flags are checked, e.g. my_models: where they call "
                  "fedmerge_jax.models.register_model / algorithms.register_algorithm.")


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
      sys.exit(f"FATAL --imports={name}: cannot import it ({e}). Give a module name (no .py), "
               "run from the folder that holds it, or add that folder to PYTHONPATH.")


def parse_flags(argv):
  """absl's parsing (flag errors as one FATAL line), and ml_collections' unknown keys likewise.

  Modules named by --imports are imported first.
  """
  import_user_modules(argv)
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = str(e).strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
    sys.exit(f"FATAL Flags parsing error: unknown config key {message}\n"
             "Every valid key, with its meaning, is listed in fedmerge_jax/config.py.")


def quiet_library_logs() -> None:
  """Keeps warnings and errors from chatty libraries, drops their INFO lines."""
  def keep(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        part in record.pathname for part in CHATTY_LIBRARIES)
  absl_logging.get_absl_handler().addFilter(keep)
