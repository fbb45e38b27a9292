"""One error type for data that is missing or broken, so mains can report it cleanly."""


class DataError(ValueError):
  """Missing, truncated or corrupt data: the message names the file and the fix."""
