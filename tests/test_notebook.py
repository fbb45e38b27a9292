"""The Colab quick start runs end to end, shows its plots, and installs the package right."""

import importlib.util
import os
import shutil
import subprocess
import sys

import nbformat
from nbclient import NotebookClient
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
QUICKSTART = os.path.join(NOTEBOOKS, "quickstart.ipynb")


def code_cell(cell_id):
  (cell,) = [c for c in nbformat.read(QUICKSTART, as_version=4).cells if c.get("id") == cell_id]
  return cell.source


def default_config():
  spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "configs/default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_committed_notebook_has_no_outputs():
  for cell in nbformat.read(QUICKSTART, as_version=4).cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.id
      assert not any(line.lstrip().startswith(("!", "%")) for line in cell.source.splitlines())


def test_quickstart_runs_and_shows_plots(monkeypatch):
  # The kernel finds the package through PYTHONPATH (the 'already importable' case), so the
  # test never pip-installs into the environment.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  notebook = nbformat.read(QUICKSTART, as_version=4)
  NotebookClient(
    notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": NOTEBOOKS}}
  ).execute()  # Raises on any error.
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "test/acc_mean" in text
  pngs = [line for line in text.splitlines() if line.endswith(".png")]
  workdir = os.path.dirname(pngs[0])
  try:
    assert os.path.exists(os.path.join(workdir, "accuracy.png"))
    if os.path.exists(os.path.join(workdir, "clients.npz")):
      assert os.path.exists(os.path.join(workdir, "merging_weights.png"))
    assert all(os.path.exists(p) for p in pngs)
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == len(pngs) >= 1
  finally:
    shutil.rmtree(workdir)


def test_fallback_config_matches_configs_default():
  namespace = {}
  exec(code_cell("config"), namespace)  # Loads configs/default.py itself; prints one line.
  assert namespace["config"].to_dict() == default_config().to_dict()
  assert namespace["default_settings"]().to_dict() == default_config().to_dict()


def run_install_cell(monkeypatch, where, repo_url=None, gpu=False):
  """Executes the install cell as if fedmerge_jax were not installed; returns pip's command."""
  calls, find_spec = [], importlib.util.find_spec
  monkeypatch.setattr(subprocess, "check_call", calls.append)
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name == "fedmerge_jax" else find_spec(name, *a),
  )
  monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if gpu else None)
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(where)
  source = code_cell("install")
  if repo_url is not None:
    source = source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}", 1)
  exec(source, {})
  (command,) = calls
  assert command[1:5] == ["-m", "pip", "install", "-q"]
  return command[5:]


def test_install_cell_has_exactly_one_line_to_set():
  marked = [line for line in code_cell("install").splitlines() if "# <-- SET THIS" in line]
  assert len(marked) == 1 and marked[0].startswith('REPO_URL = ""')


def test_install_cell_inside_the_repository_installs_it(monkeypatch):
  assert run_install_cell(monkeypatch, NOTEBOOKS) == ["-e", ROOT]


def test_install_cell_without_repo_url_says_what_to_set(monkeypatch, tmp_path):
  with pytest.raises(RuntimeError, match="set REPO_URL in this cell .*<-- SET THIS"):
    run_install_cell(monkeypatch, tmp_path)


@pytest.mark.parametrize(
  "url",
  [
    "https://github.com/someone/fedmerge_jax",
    "https://github.com/someone/fedmerge_jax.git/",
    "git+https://github.com/someone/fedmerge_jax.git",
  ],
)
def test_install_cell_installs_from_repo_url(monkeypatch, tmp_path, url):
  target = run_install_cell(monkeypatch, tmp_path, repo_url=url)
  assert target == ["git+https://github.com/someone/fedmerge_jax.git"]


def test_install_cell_on_a_gpu_runtime_adds_jax_cuda(monkeypatch, tmp_path):
  target = run_install_cell(monkeypatch, tmp_path, repo_url="https://github.com/a/b", gpu=True)
  assert target == ["git+https://github.com/a/b.git", "jax[cuda12]"]
