"""FedAvg, then each client fine-tunes a copy of the global model before evaluation.

Training is FedAvg's; only what a client predicts with changes: the global model after
`config.finetune_epochs` epochs of local SGD on the client's own training data.
"""

import jax

from fedmerge_jax.algorithms import base, fedavg

FINETUNE_STREAM = 0x5EED  # Fine-tuning keys: fold_in(key(seed), this), then the client id.


def make(model, config, num_clients, example_input):
  algorithm = fedavg.make(model, config, num_clients, example_input)
  local = base.local_config(config, prox_mu=0.0, local_epochs=config.finetune_epochs)
  rng = jax.random.fold_in(jax.random.key(config.seed), FINETUNE_STREAM)

  def personalized(state, client_ids, train_data):
    received = algorithm.personalized(state, client_ids, train_data)
    tuned, _ = base.trained_models(
      model,
      received,
      train_data,
      rng,
      client_ids,
      local,
      config.client_chunk_size,
      parallelism=config.client_parallelism,
    )
    return tuned

  # The server sends the global model; clients fine-tune it only to predict (gap metric).
  return algorithm._replace(personalized=personalized, received=algorithm.personalized)
