"""Command-line helpers shared by the absl mains (launch.py, python -m fedmerge_jax.compare)."""

import logging
import sys

from absl import app
from absl import logging as absl_logging

CHATTY_LIBRARIES = ("/orbax/",)  # Their INFO lines narrate every checkpoint write.


def parse_flags(argv):
  """absl's parsing (flag errors as one FATAL line), and ml_collections' unknown keys likewise."""
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
