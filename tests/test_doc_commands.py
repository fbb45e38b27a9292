"""Every launch.py and compare command the docs show parses and names real things.

The runnable blocks (test_docs.py) run a few commands end to end; the rest are measurement
commands of minutes or hours, or need a dataset. Each of those is parsed here by its program's
own flags (an unknown flag, config field or algorithm fails the parse), its config resolved
and its sweeps and replicas checked, as the program does before it starts any work.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = os.path.join(ROOT, "docs", "pages")
BLOCK = re.compile(r"```(?:bash|sh)\n(.*?)\n```", re.S)

# Parses each argv in turn with the program's flags, in a process of its own (both programs
# define --config on absl's global flags).
CHECKER = r"""
import json, runpy, sys
from absl import flags
from fedmerge_jax import cli, config as config_lib
program, commands = sys.argv[1], json.loads(sys.argv[2])
if program == "compare":
  from fedmerge_jax import compare
else:
  runpy.run_path("launch.py", run_name="launch")
failed = []
for argv in commands:
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # The overrides the last command's parse defined.
  sys.argv = [program, *argv]  # ml_collections reads the overrides from sys.argv.
  try:
    cli.parse_flags(sys.argv)
    config = config_lib.resolve(flags.FLAGS.config)
    if program == "compare":
      compare.parse_sweeps(flags.FLAGS.sweep, config)
      compare.parse_replicas(flags.FLAGS.replicas)
  except (Exception, SystemExit) as e:
    failed.append(f"{program} {' '.join(argv)}: {type(e).__name__}: {e}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def program_argv(tokens):
  """(program, argv) of the launch/compare command in shell `tokens`, looking inside quoted
  commands (`--command="... python launch.py ..."`) too; None if there is none."""
  for i, token in enumerate(tokens):
    if token.endswith("python") and tokens[i + 1 : i + 2] == ["launch.py"]:
      return "launch", tokens[i + 2 :]
    if token.endswith("python") and tokens[i + 1 : i + 3] == ["-m", "fedmerge_jax.compare"]:
      return "compare", tokens[i + 3 :]
    if " " in token:
      inner = program_argv(shlex.split(token.split("=", 1)[-1].split("&&")[-1]))
      if inner:
        return inner
  return None


def doc_commands():
  """{program: [(page, argv)]} of every launch/compare command in the pages' bash blocks,
  but `--imports` ones (test_workflow runs the extending page's)."""
  found = {"launch": [], "compare": []}
  for name in sorted(os.listdir(PAGES)):
    if not name.endswith(".md"):
      continue
    with open(os.path.join(PAGES, name)) as f:
      text = f.read()
    for block in BLOCK.findall(text):
      for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        command = program_argv(shlex.split(line, comments=True))
        if command and not any(a.startswith("--imports") for a in command[1]):
          found[command[0]].append((name, command[1]))
  return found


def test_the_pages_show_both_programs():
  found = doc_commands()
  assert len(found["launch"]) >= 5 and len(found["compare"]) >= 5, found


@pytest.mark.parametrize("program", ["launch", "compare"])
def test_every_doc_command_parses_with_real_flags_fields_and_algorithms(program):
  argvs = [argv for _, argv in doc_commands()[program]]
  done = subprocess.run(
    [sys.executable, "-c", CHECKER, program, json.dumps(argvs)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])),
  )
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
