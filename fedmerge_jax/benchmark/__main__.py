"""python -m fedmerge_jax.benchmark: the flags (options.py) to rows printed as JSON lines; see
the package's docstring for what each row holds."""

import json
from typing import Any, Dict, List

from absl import app
import numpy as np

from fedmerge_jax import cli
from fedmerge_jax import client as client_lib
from fedmerge_jax.benchmark import flops, reference, scaling, targets, timing, workloads
from fedmerge_jax.benchmark.options import FLAGS, SCALING_WORKER_FLAGS, make_config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  ks = [int(k) for k in FLAGS.num_global_models]
  if FLAGS.scaling_worker:
    config = make_config(FLAGS.algorithm[0], FLAGS.model[0], ks[0])
    print(
      json.dumps(
        scaling.scaling_row(
          config,
          FLAGS.scaling_worker,
          FLAGS.scaling_rounds,
          FLAGS.examples_per_client,
          FLAGS.image_shape,
          FLAGS.num_classes,
        )
      ),
      flush=True,
    )
    return
  try:
    names = workloads.parse_workloads(FLAGS.client_sizes)
    sizes = {
      w: workloads.client_sizes(w, FLAGS.clients, FLAGS.examples_per_client, FLAGS.seed)
      for w in names
    }
  except (ValueError, FileNotFoundError) as error:
    raise app.UsageError(str(error)) from None
  runs = [
    (m, a, k)
    for m in FLAGS.model
    for a in FLAGS.algorithm
    for k in (ks[:1] if a == "fedavg" else ks)
  ]
  configs = [make_config(a, m, k) for m, a, k in runs]  # Fail fast.
  peaks = {
    dtype: flops.matmul_peak_gflops(FLAGS.peak_size, dtype=dtype)  # TF32 (GPU), bf16.
    for dtype in client_lib.COMPUTE_DTYPES
  }
  rows: List[Dict[str, Any]] = []
  dtype = np.float16 if FLAGS.data_dtype == "float16" else np.float32

  def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)

  for model in FLAGS.model:
    for workload in names:
      data = workloads.synthetic_data(
        model,
        sizes[workload],
        FLAGS.seed,
        dtype,
        name=workload if workload in workloads.WORKLOADS else "list",
        example_shape=FLAGS.image_shape,
        num_classes=FLAGS.num_classes,
      )
      loop = None
      if FLAGS.reference:
        reference_config = make_config("fedavg", model, 1)
        reference_config.model.conv_impl = FLAGS.reference_conv_impl
        schedule = timing.round_schedule(reference_config, data.num_clients, 1 + FLAGS.rounds)
        loop = reference.loop_reference(reference_config, data, schedule[1:])
        emit(loop)
      for config in (c for c in configs if c.model.name == model):
        emit(timing.round_row(config, data, peaks, FLAGS.rounds, loop, FLAGS.profile_kernels))
        if FLAGS.breakdown:
          emit(timing.breakdown_row(config, data, FLAGS.rounds))
  if FLAGS.scaling:
    passed = [FLAGS[name].serialize() for name in SCALING_WORKER_FLAGS]
    for m, a, k in runs:
      rows.extend(scaling.run_scaling(a, m, k, FLAGS.scaling_clients, passed))
  if FLAGS.targets:
    emit(targets.targets_row(rows))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)  # Quiet logs; --verbosity=1 for detail.
