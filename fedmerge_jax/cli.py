"""Command-line helpers shared by the absl mains (launch.py, python -m fedmerge_jax.compare)."""

import sys

from absl import app


def parse_flags(argv):
  """absl's parsing (flag errors as one FATAL line), and ml_collections' unknown keys likewise."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = str(e).strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
    sys.exit(f"FATAL Flags parsing error: unknown config key {message}\n"
             "Every valid key, with its meaning, is listed in fedmerge_jax/config.py.")
