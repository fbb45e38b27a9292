"""The fixed choices of config fields, JAX-free, so `config` checks them before JAX loads.

The modules that act on a choice import its tuple from here (parallel, client, server_optim,
models.layers, algorithms.perfedavg); names users extend (models, algorithms) are
`registry` tables.
"""

CLIENT_PARALLELISMS = ("auto", "vmap", "sequential")  # config.client_parallelism (parallel.py).
REPLICA_PARALLELISMS = ("auto", "vmap", "sequential")  # config.replica_parallelism (replicas.py).
LOCAL_LOOP_CHOICES = ("auto", "while", "static")  # config.local_loop (client.py, parallel.py).
# config.command_buffers -> XLA:GPU's `xla_gpu_enable_command_buffer` (None: XLA's default).
# '+' entries add to XLA's default set: 'loops' lets a whole while loop or conditional run as
# one CUDA graph, with no host round-trip per iteration.
COMMAND_BUFFERS = {"default": None, "off": "", "loops": "+WHILE,+CONDITIONAL"}
LOCAL_BATCHINGS = ("epoch", "stream")  # config.local_batching (client.py).
COMPUTE_DTYPES = ("float32", "bfloat16")  # config.compute_dtype (client.py).
UPDATE_MODES = ("official", "gradient")  # config.update_mode (server_optim.py).
LOGIT_STEPS = ("authors", "max_normalized")  # config.logit_step, `official` mode's logit step.
# config.model.conv_impl; 'batched_matmul' / 'batched_shifted': per-client kernels as
# client-batched matmuls (models/layers.py).
CONV_IMPLS = ("auto", "xla", "canonical", "patches", "batched_matmul", "batched_shifted")
PERFEDAVG_VARIANTS = ("fo", "hf")  # config.perfedavg_variant (algorithms/perfedavg.py).
