"""The table of benchmarks/gpu_vmap.sh: one line per `round` row of its JSON lines file, then
the matmul peaks and the top kernels of the slowest and the fastest variant.

  python benchmarks/gpu_vmap_table.py $OUT/gpu_vmap.jsonl
"""

import json
import sys

HEAD = (
  "label",
  "model",
  "sizes",
  "conv",
  "dtype",
  "loop",
  "cmd buf",
  "chunk",
  "useful ex/s",
  "real",
  "of peak",
  "round s",
  "compile s",
)


def _peak(row) -> str:
  return "-" if row.get("fraction_of_peak") is None else f"{row['fraction_of_peak']:.3f}"


def table(rows) -> str:
  """Markdown: the rows by model and sizes, then peaks and the extremes' top kernels."""
  rows = [r for r in rows if r.get("kind") == "round"]
  lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
  for r in sorted(rows, key=lambda r: (r["model"], r["workload"], -r["useful_examples_per_s"])):
    chunk = r["client_chunk_size"] if r["client_parallelism"] == "vmap" else 1
    if r["client_parallelism"] == "vmap" and r.get("requested_chunk_size") == 0:
      chunk = f"chosen: {chunk or 'all'}"
    lines.append(
      f"| {r.get('label', '')} | {r['model']} | {r['workload']} | {r['conv_impl']} | "
      f"{r['compute_dtype']} | {r['local_loop']} | {r['command_buffers']} | {chunk} | "
      f"{r['useful_examples_per_s']:,.0f} | {r['real_fraction']:.2f} | {_peak(r)} | "
      f"{r['round_s']:.3f} | {r['compile_s']:.1f} |"
    )
  if not rows:
    return "\n".join(lines + ["", "(no rows)"])
  peaks = rows[0]["matmul_peaks_gflops"]
  lines += [
    "",
    f"Dense matmul peaks measured in the run ({rows[0]['backend']}): "
    + ", ".join(f"{dtype} {gflops:,.0f} GFLOP/s" for dtype, gflops in sorted(peaks.items())),
  ]
  slowest = min(rows, key=lambda r: r["useful_examples_per_s"])
  fastest = max(rows, key=lambda r: r["useful_examples_per_s"])
  for name, r in (("Slowest", slowest), ("Fastest", fastest)):
    lines += [
      "",
      f"{name} variant: {r.get('label', '')} {r['model']} {r['workload']} "
      f"({r['useful_examples_per_s']:,.0f} useful ex/s); top kernels of one round:",
    ]
    lines += [
      f"- {ms:9.3f} ms {share:6.1%}  {kernel[:100]}"
      for kernel, ms, share in (r.get("top_kernels") or [])
    ] or ["- (not profiled)"]
  return "\n".join(lines)


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    print(table(json.loads(line) for line in f if line.startswith("{")))
