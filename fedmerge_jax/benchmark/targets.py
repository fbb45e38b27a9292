"""The project's performance targets, judged on a run's rows (or the flags each needs)."""

from typing import Any, Dict, List

FEDJAX_EXAMPLES_PER_S = 1400  # FedJAX 0.0.17, EMNIST CNN, 10 x 200, batch 20, 2-core CPU.
TARGET_SETTING = {
  "model": "emnist_cnn",
  "clients": 10,
  "examples_per_client": 200,
  "batch_size": 20,
  "local_epochs": 1,
}
# The unequal-clients targets: FEMNIST-like writers, 10 a round of 100, against equal sizes.
UNEQUAL_SETTING = {"model": "emnist_cnn", "batch_size": 20, "local_epochs": 1}
UNEQUAL_FLAGS = (
  "--model=emnist_cnn --batch_size=20 --local_epochs=1 --clients=100 --clients_per_round=10"
)
MEMORY_BUDGET_BYTES = 24 * 2**30


def _check(name: str, target: str, measured, passed, needs: str, **extra) -> Dict[str, Any]:
  """One target: measured value and pass/fail, or (not measured) the flags it `needs`."""
  row = {
    "name": name,
    "target": target,
    "measured": measured,
    "pass": None if measured is None else bool(passed),
    **extra,
  }
  if measured is None:
    row["needs"] = needs
  return row


def targets_row(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
  """The issue's targets against this run's rows; where one was not measured, its `needs`."""

  def find(kind, **match):
    found = [
      r for r in rows if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items())
    ]
    return found[0] if found else None

  fedavg = find("round", algorithm="fedavg", workload="equal", **TARGET_SETTING)
  equal_needs = (
    "--model=emnist_cnn --algorithm=fedavg --client_sizes=equal --clients=10 "
    "--examples_per_client=200 --batch_size=20 --local_epochs=1"
  )
  checks = [
    _check(
      "fedavg_emnist_cnn_vs_fedjax",
      f">= 2 x FedJAX's {FEDJAX_EXAMPLES_PER_S} examples/s",
      fedavg and fedavg["useful_examples_per_s"],
      fedavg and fedavg["useful_examples_per_s"] >= 2 * FEDJAX_EXAMPLES_PER_S,
      equal_needs,
    ),
    _check(
      "fedavg_emnist_cnn_speedup_vs_loop",
      ">= 2 x this run's loop of jitted steps",
      fedavg and fedavg["speedup_vs_loop"],
      fedavg and (fedavg["speedup_vs_loop"] or 0) >= 2,
      equal_needs + " --reference",
    ),
    _check(
      "fedavg_emnist_cnn_fraction_of_peak",
      ">= 0.5 of the f32 matmul peak",
      fedavg and fedavg["fraction_of_peak"],
      fedavg and (fedavg["fraction_of_peak"] or 0) >= 0.5,
      equal_needs,
    ),
  ]
  # Unequal clients: FEMNIST-like sizes against equal ones, the loop, and FedMerge K = 5.
  femnist = find("round", algorithm="fedavg", workload="femnist", **UNEQUAL_SETTING)
  on = lambda r: {k: r[k] for k in ("clients", "clients_per_round")} if r else {}
  equal = find("round", algorithm="fedavg", workload="equal", **UNEQUAL_SETTING, **on(femnist))
  ratio = femnist and equal and femnist["useful_examples_per_s"] / equal["useful_examples_per_s"]
  checks.append(
    _check(
      "fedavg_femnist_vs_equal_sizes",
      ">= 0.9 x the useful examples/s of equal sizes (FedAvg, EMNIST CNN)",
      ratio,
      ratio and ratio >= 0.9,
      f"--algorithm=fedavg --client_sizes=equal,femnist {UNEQUAL_FLAGS} "
      "(--examples_per_client=206 for the same total examples)",
      totals=[r["total_examples"] for r in (femnist, equal) if r],
    )
  )
  checks.append(
    _check(
      "fedavg_femnist_vs_loop",
      ">= 2 x the loop of jitted steps on the same run",
      femnist and femnist["speedup_vs_loop"],
      femnist and (femnist["speedup_vs_loop"] or 0) >= 2,
      f"--algorithm=fedavg --client_sizes=femnist --reference {UNEQUAL_FLAGS}",
    )
  )
  rounds = [r for r in rows if r.get("kind") == "round"]
  pairs = [
    (a, b)
    for a in rounds
    for b in rounds
    if a["algorithm"] == "fedavg"
    and b["algorithm"] == "fedmerge"
    and b["num_global_models"] == 5
    and all(
      a[k] == b[k]
      for k in ("model", "workload", "clients", "clients_per_round", "batch_size", "local_epochs")
    )
  ]
  pairs.sort(key=lambda p: (p[0]["workload"] != "femnist", p[0]["model"] != "emnist_cnn"))
  fedavg_k, fedmerge_k = pairs[0] if pairs else (None, None)
  overhead = fedavg_k and (
    fedavg_k["useful_examples_per_s"] / fedmerge_k["useful_examples_per_s"] - 1
  )
  checks.append(
    _check(
      "fedmerge_k5_overhead",
      "FedMerge K=5 useful examples/s within 10% of FedAvg's, same workload",
      overhead,
      overhead is not None and overhead <= 0.1,
      f"--algorithm=fedavg,fedmerge --num_global_models=5 --client_sizes=femnist {UNEQUAL_FLAGS}",
      workload=fedavg_k and fedavg_k["workload"],
    )
  )
  shaped = [
    r
    for r in rounds
    if r["workload"] == "femnist" and r["model"] in ("emnist_cnn", "leaf_femnist_cnn")
  ]
  memory = shaped[0]["memory_ratio"] if shaped else None
  checks.append(
    _check(
      "femnist_host_memory",
      "ragged FEMNIST-shaped training split <= 1.2 x its real size",
      memory,
      memory is not None and memory <= 1.2,
      "--model=emnist_cnn --client_sizes=femnist",
    )
  )
  scaled = [r for r in rows if r.get("kind") == "scaling" and "error" not in r]
  groups = {}
  for r in scaled:  # One series per (model, algorithm, K); EMNIST CNN FedAvg if measured.
    groups.setdefault(
      (
        r["model"] != "emnist_cnn",
        r["algorithm"] != "fedavg",
        r["model"],
        r["algorithm"],
        r["num_global_models"],
      ),
      [],
    ).append(r)
  series = sorted(groups[min(groups)], key=lambda r: r["clients"]) if groups else []
  biggest = series[-1] if series and series[-1]["model"] == "emnist_cnn" else None
  scaling_needs = (
    "--model=emnist_cnn --algorithm=fedavg --scaling --scaling_clients=10,100,1000,3400"
  )
  checks.append(
    _check(
      "emnist_cnn_3400_clients_fit_24gib",
      "3,400 clients: peak RSS <= 24 GiB",
      biggest["peak_rss_bytes"] if biggest and biggest["clients"] >= 3400 else None,
      biggest and biggest["peak_rss_bytes"] <= MEMORY_BUDGET_BYTES,
      scaling_needs,
    )
  )
  growth = linear = None
  if len(series) >= 2:
    small, big = series[0], series[-1]
    non_data = lambda r: r["peak_rss_bytes"] - r["data_bytes"]
    growth = (
      (non_data(big) - non_data(small))
      / (big["clients"] - small["clients"])
      / big["delta_bytes_per_client"]
    )
    per_client = [r["round_s"] / r["clients"] for r in series if r["clients"] >= 100] or [
      r["round_s"] / r["clients"] for r in series
    ]
    linear = max(per_client) / min(per_client)
  series_on = series and {k: series[0][k] for k in ("model", "algorithm", "num_global_models")}
  checks.append(
    _check(
      "memory_grows_with_chunk_not_clients",
      "peak RSS beyond the data grows < 0.5 deltas per extra client (stacking: >= 1)",
      growth,
      growth is not None and growth < 0.5,
      scaling_needs,
      series=series_on or None,
    )
  )
  checks.append(
    _check(
      "round_time_linear_in_clients",
      "seconds per client (scales >= 100 clients) vary by <= 1.3x",
      linear,
      linear is not None and linear <= 1.3,
      scaling_needs,
      series=series_on or None,
    )
  )
  return {"kind": "targets", "checks": checks}
