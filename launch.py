"""Runs one experiment: python launch.py --config=configs/default.py --workdir=/tmp/run

Override any config field on the command line, e.g. --config.num_rounds=20.
All logic lives in `fedmerge_jax.train` so that Colab and tests can import it.
On several hosts (a TPU pod slice, a GPU cluster) run the same command on every host
with --multihost: see docs/pages/devices.md. Quiet by default: --verbosity=1
shows the libraries' log lines too.

The config is checked before JAX is imported, so a bad one fails in about a second;
every expected failure ends in one FATAL line that keeps the finished rounds.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from fedmerge_jax import cli
from fedmerge_jax import config as config_lib

FLAGS = flags.FLAGS
DEFAULT_WORKDIR = "/tmp/fedmerge_jax"
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "Where metrics and the config are written.")
flags.DEFINE_bool(
  "start_over",
  False,
  "Delete the results and checkpoints a --workdir holds "
  "(of another experiment, or this one) and start there from round 0.",
)
flags.DEFINE_bool(
  "multihost",
  False,
  "Join a multi-host run (jax.distributed.initialize) "
  "before touching devices; TPU pods, SLURM and Open MPI are auto-detected.",
)
flags.DEFINE_string("coordinator_address", None, "--multihost elsewhere: process 0's host:port.")
flags.DEFINE_integer("num_processes", None, "--multihost elsewhere: number of processes.")
flags.DEFINE_integer("process_id", None, "--multihost elsewhere: this process's index.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.check_workdir(FLAGS.workdir)
  try:
    config_lib.resolve(FLAGS.config)  # Before importing JAX: a bad config fails at once.
  except config_lib.ConfigError as e:
    cli.fatal(f"ConfigError: {e}")
  if not FLAGS["workdir"].present:
    print(f"Writing to {FLAGS.workdir} (no --workdir given; --workdir=DIR chooses).", flush=True)
  # pylint: disable=import-outside-toplevel
  import jax
  from fedmerge_jax import checkpoint as checkpoint_lib
  from fedmerge_jax import failures
  from fedmerge_jax import train

  if FLAGS.multihost:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

  def saved_in(last_round: int) -> str:
    return (
      f"rounds up to {last_round} are saved in {os.path.join(FLAGS.workdir, 'checkpoints')}"
      "; rerun to resume."
    )

  def interrupted() -> str:
    saved = checkpoint_lib.saved_rounds(FLAGS.workdir)
    return (
      f"FATAL interrupted; {saved_in(saved[-1])}"
      if saved
      else "FATAL interrupted before any round was saved; rerun to start again."
    )

  def stopped(signal_name: str) -> str:  # A stop signal outside the round loop.
    saved = checkpoint_lib.saved_rounds(FLAGS.workdir)
    if not saved:
      return f"stopped by {signal_name} before round 1; nothing saved yet; rerun to start."
    when = f" before round {saved[-1] + 1}" if saved[-1] < FLAGS.config.num_rounds else ""
    return f"stopped by {signal_name}{when}; {saved_in(saved[-1])}"

  summary = failures.reporting_run_failures(
    lambda: train.train_and_evaluate(FLAGS.config, FLAGS.workdir, start_over=FLAGS.start_over),
    interrupted,
    stopped,
  )
  if jax.process_index() == 0:
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
