"""The documentation site builds in strict mode, its runnable blocks run, and ruff passes.

A fenced block preceded by `<!-- runnable -->` is run (docs/pages/contributing.md says how):
Python blocks of one page as one script, in order; `file="NAME"` writes the block to NAME
instead; bash blocks after that, each with `with="..."` appended to its launch/compare lines.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = os.path.join(ROOT, "docs", "pages")
MARKER = re.compile(
  r"<!-- runnable(?P<attrs>[^>]*?)-->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S
)
ATTR = re.compile(r'(\w+)="([^"]*)"')
COMMAND = re.compile(r"^\s*(\w+=\S+\s+)*python (launch\.py|-m fedmerge_jax\.)")


def runnable_blocks(text):
  """[(lang, attrs, body)] of the blocks marked runnable, in document order."""
  return [(m["lang"], dict(ATTR.findall(m["attrs"])), m["body"]) for m in MARKER.finditer(text)]


def with_overrides(script, extra):
  """Appends `extra` to every launch.py / fedmerge_jax command of a bash block (its last line)."""
  lines, out, in_command = script.splitlines(), [], False
  for line in lines:
    in_command = in_command or bool(COMMAND.match(line))
    if in_command and not line.rstrip().endswith("\\"):
      line, in_command = f"{line} {extra}", False
    out.append(line)
  return "\n".join(out)


def run_page(text, folder):
  """Runs a page's runnable blocks in `folder` (workdirs under /tmp moved into it)."""
  for name in ("launch.py", "configs", "benchmarks"):
    os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
    TQDM_DISABLE="1",
  )
  python, bash = [], []
  for lang, attrs, body in runnable_blocks(text):
    body = body.replace("/tmp/", folder + "/")
    if "file" in attrs:
      with open(os.path.join(folder, attrs["file"]), "w") as f:
        f.write(body + "\n")
    elif lang == "python":
      python.append(body)
    elif lang == "bash":
      bash.append(with_overrides(body, attrs.get("with", "")))
    else:
      raise AssertionError(f"runnable block of unknown language {lang!r}")
  commands = [[sys.executable, "-c", "\n\n".join(python)]] if python else []
  commands += [["bash", "-euo", "pipefail", "-c", script] for script in bash]
  for command in commands:
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
      f"{shlex.join(command[-1:])[:2000]}\nexited "
      f"{done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
  return len(commands)


def pages():
  return sorted(name for name in os.listdir(PAGES) if name.endswith(".md"))


def read(name):
  with open(os.path.join(PAGES, name)) as f:
    return f.read()


def mkdocs_build(docs_dir, site_dir):
  config = os.path.join(os.path.dirname(docs_dir), "mkdocs.yml")
  return subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", config, "-d", site_dir],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
  )


# --- The site -------------------------------------------------------------------------------


def test_site_builds_in_strict_mode(tmp_path):
  done = mkdocs_build(PAGES, str(tmp_path / "site"))
  assert done.returncode == 0, done.stdout + done.stderr
  api = (tmp_path / "site" / "api" / "index.html").read_text()
  assert "server_gradients" in api and "train_and_evaluate" in api  # From the docstrings.


@pytest.mark.parametrize(
  "breakage",
  [  # (page, text, broken text, what the build names)
    ("getting-started.md", "(long-runs.md)", "(long-run.md)", "long-run.md"),
    (
      "getting-started.md",
      "(contributing.md#running-the-tests)",
      "(contributing.md#no-such)",
      "#no-such",
    ),
    ("api.md", "::: fedmerge_jax.merge\n", "::: fedmerge_jax.no_such_module\n", "no_such_module"),
  ],
)
def test_strict_build_fails_on_a_broken_link_anchor_or_reference(tmp_path, breakage):
  page, old, new, named = breakage
  docs = tmp_path / "docs"
  shutil.copytree(os.path.join(ROOT, "docs"), docs)
  text = (docs / "pages" / page).read_text()
  assert old in text, f"{page} no longer holds {old!r}: pick another link to break"
  (docs / "pages" / page).write_text(text.replace(old, new, 1))
  (docs / "mkdocs.yml").write_text(
    (docs / "mkdocs.yml").read_text().replace("paths: [..]", f"paths: [{ROOT}]")
  )
  done = mkdocs_build(str(docs / "pages"), str(tmp_path / "site"))
  assert done.returncode != 0, f"the build passed with {new!r} in {page}"
  assert named in done.stdout + done.stderr  # It failed for that reason.


# Modules of the package's top level that are internal plumbing, not API: the rest must be
# named in api.md, so a new module cannot go undocumented.
INTERNAL = {"cli", "progress"}


def test_every_top_level_module_is_in_the_api_reference():
  listed = set(re.findall(r"^::: fedmerge_jax\.(\w+)$", read("api.md"), flags=re.M))
  package = os.path.join(ROOT, "fedmerge_jax")
  modules = {
    name[:-3] if name.endswith(".py") else name
    for name in os.listdir(package)
    if (name.endswith(".py") and not name.startswith("_"))
    or os.path.isfile(os.path.join(package, name, "__init__.py"))
  }
  assert modules - INTERNAL - listed == set()


def test_readme_links_into_the_docs_resolve():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert len(readme.splitlines()) <= 150
  targets = re.findall(r"\]\((?!https?://)([^)#]+)(?:#[^)]*)?\)", readme)
  assert any(t.startswith("docs/pages/") for t in targets)
  missing = [t for t in targets if not os.path.exists(os.path.join(ROOT, t))]
  assert not missing, f"README links to missing files: {missing}"


# --- Runnable blocks ------------------------------------------------------------------------

RUNNABLE_PAGES = [name for name in pages() if runnable_blocks(read(name))]


def test_the_marker_finds_the_blocks_a_user_copies():
  # The offline commands of getting started and extending are all marked.
  assert {"getting-started.md", "extending.md"} <= set(RUNNABLE_PAGES)
  files = [a.get("file") for _, a, _ in runnable_blocks(read("extending.md"))]
  assert {"my_models.py", "my_algorithms.py"} <= set(files)


def test_with_appends_to_each_command_once():
  script = (
    "python launch.py --config=a \\\n    --workdir=w\necho done\n"
    "XLA_FLAGS=--f python -m fedmerge_jax.compare --x"
  )
  assert with_overrides(script, "--y").splitlines() == [
    "python launch.py --config=a \\",
    "    --workdir=w --y",
    "echo done",
    "XLA_FLAGS=--f python -m fedmerge_jax.compare --x --y",
  ]


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_runnable_blocks_run(tmp_path, page):
  assert run_page(read(page), str(tmp_path)) >= 1


def test_a_broken_runnable_block_fails(tmp_path):
  # The page's my_models.py with a typo in the model's name, then the command that imports it.
  blocks = [
    m[0]
    for m in MARKER.finditer(read("extending.md"))
    if 'file="my_models.py"' in m[0] or "--imports=my_models --config" in m[0]
  ]
  assert len(blocks) == 2
  text = "\n\n".join(blocks[:2]).replace("TwoLayer(num_classes))", "TwoLayr(num_classes))")
  with pytest.raises(AssertionError, match="NameError: name 'TwoLayr'"):
    run_page(text, str(tmp_path))


# --- ruff -----------------------------------------------------------------------------------


RUFF_PATHS = ["fedmerge_jax", "tests", "launch.py", "configs", "docs", "benchmarks"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_passes(command):
  """ruff's linter and formatter (pyproject.toml: 2-space indents, 100 columns) find nothing."""
  done = subprocess.run(
    [sys.executable, "-m", "ruff", *command, "--no-cache", *RUFF_PATHS],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 0, done.stdout + done.stderr
