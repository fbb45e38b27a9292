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
  cell, = [c for c in nbformat.read(QUICKSTART, as_version=4).cells if c.get("id") == cell_id]
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
  NotebookClient(notebook, kernel_name="python3", timeout=600,
                 resources={"metadata": {"path": NOTEBOOKS}}).execute()  # Raises on any error.
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


@pytest.mark.parametrize("where", ["notebooks", "elsewhere"])
def test_install_cell_picks_the_repository_or_repo_url(where, tmp_path, monkeypatch):
  calls, find_spec = [], importlib.util.find_spec
  monkeypatch.setattr(subprocess, "check_call", calls.append)
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "fedmerge_jax" else find_spec(name, *a))
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(NOTEBOOKS if where == "notebooks" else tmp_path)
  namespace = {}
  exec(code_cell("install"), namespace)
  command, = calls
  assert command[1:5] == ["-m", "pip", "install", "-q"]
  if where == "notebooks":
    assert command[5:] == ["-e", ROOT]
  else:
    assert command[5:] == [namespace["REPO_URL"]] and command[5].startswith("git+")
