"""A griffe extension: the package's docstrings are plain prose, not Markdown: render them so.

Lines indented past the paragraph (command lines, examples) become code blocks; elsewhere
`<`, `[` and `*` outside backquotes are escaped, so `<workdir>` and `[--seeds=...]` show as written.
"""

import re

import griffe

_CODE_SPAN = re.compile(r"(`[^`]*`)")


def _escape(line: str) -> str:
  """Escapes Markdown's markup characters outside `code spans`."""
  parts = _CODE_SPAN.split(line)
  for i in range(0, len(parts), 2):
    parts[i] = re.sub(r"([\[\]*_\\])", r"\\\1", parts[i]).replace("<", "&lt;")
  return "".join(parts)


def to_markdown(text: str) -> str:
  """Plain docstring text (already dedented) -> Markdown: indented runs become code blocks."""
  out, code = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("  "):
      code.append(line)
      continue
    if code:
      out += ["", "```text", *code, "```", ""]
      code = []
    out.append(_escape(line))
  return "\n".join(out).strip() + "\n"


class PlainDocstrings(griffe.Extension):
  """Converts every loaded object's docstring with `to_markdown`."""

  def on_object(self, *, obj, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = to_markdown(obj.docstring.value)
