"""Every shell command the README, docs/*.md and the configs' docstrings tell a user to type.

``collect()`` finds them (code blocks, inline code spans, indented docstring lines; ``\\``
continuations joined) and returns :class:`Command` objects: the entry point
(``cljax.main``, ``cljax.evaluate``, ``cljax.bench``, ``cljax.data.prepare`` or a ``make``
target) and its arguments, with the documents' placeholders (``DIR``, ``<data_dir>``,
``[--workers=N]``) marked. ``tests/test_documented_commands.py`` parses and runs them.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import shlex

REPO = pathlib.Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("cljax.main", "cljax.evaluate", "cljax.bench", "cljax.data.prepare")
# Words the documents use for "a value of yours" (a folder, a count, a recipe).
PLACEHOLDERS = {"DIR", "W", "ROOT", "N", "M", "X", "NAME", "...", "ARGS", "TARGET"}
_START = r"(?:[A-Z_]+=\S+\s+)*(?:taskset -c \d+\s+)?(?:python -m cljax\.|make [a-z])"


@dataclasses.dataclass(frozen=True)
class Command:
  """One documented command: where it is written, and what it runs."""

  where: str  # file:line
  text: str  # as written, continuations joined
  program: str  # an entry of ENTRY_POINTS, or "make"
  args: tuple[str, ...]  # the arguments after the program (make: the target first)

  @property
  def flags(self) -> dict[str, str | None]:
    """``--name[=value]`` arguments, by name (``--config.a.b`` included)."""
    out = {}
    for arg in self.args:
      if arg.startswith("--"):
        name, _, value = arg[2:].partition("=")
        out[name] = value if "=" in arg else None
    return out

  @property
  def config(self) -> str | None:
    """The ``--config=PATH[:ARG]`` value, when it names a real file."""
    value = self.flags.get("config")
    if value and (REPO / value.split(":")[0]).is_file():
      return value
    return None

  def has_placeholder(self, *, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a value is a stand-in for the user's own (flags named in ``ignore`` aside)."""
    for name, value in self.flags.items():
      if name in ignore or value is None:
        continue
      if _is_placeholder(value):
        return True
    return False


def _is_placeholder(value: str) -> bool:
  """``DIR``, ``DIR/train.jsonl``, ``<data_dir>``, ``/path/to/...``, ``configs/X.py``."""
  return (
    any(part in PLACEHOLDERS or re.fullmatch(r"[A-Z]+", part) for part in value.split("/"))
    or "<" in value
    or "..." in value
    or "/path/to/" in value
  )


def _parse(text: str, where: str) -> Command | None:
  text = re.sub(r"\s+#.*$", "", text.strip())  # a trailing comment
  text = text.replace("[", " ").replace("]", " ")  # optional arguments are arguments
  try:
    words = shlex.split(text)
  except ValueError:
    return None
  while words and (re.fullmatch(r"[A-Z_]+=\S*", words[0]) or words[0] == "taskset"):
    words = words[3:] if words[0] == "taskset" else words[1:]
  if len(words) >= 2 and words[0] == "make":
    return Command(where, text, "make", tuple(words[1:]))
  # A bare program name is a reference to it, not a command to type.
  if len(words) >= 4 and words[:2] == ["python", "-m"] and words[2] in ENTRY_POINTS:
    return Command(where, text, words[2], tuple(words[3:]))
  return None


def _from_text(text: str, name: str, first_line: int = 1) -> list[Command]:
  """Commands in a document: a line that starts one, with its continuations, or a code span
  that holds one (spans may break across lines in prose)."""
  found: dict[tuple[int, str], Command] = {}
  lines = text.splitlines()
  for i, line in enumerate(lines):
    start = re.search(_START, line)
    if not start or "`" in line[: start.start()].replace("```", ""):
      continue
    body, j = line[start.start() :], i
    while body.rstrip().endswith("\\") and j + 1 < len(lines):
      j += 1
      body = body.rstrip()[:-1] + " " + lines[j].strip()
    command = _parse(body.split("`")[0], f"{name}:{first_line + i}")
    if command:
      found[(i, command.program)] = command
  # Code spans pair up outside fenced blocks only (a fence's three backticks would shift them).
  unfenced = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
  for match in re.finditer(r"`([^`]+)`", unfenced):
    span = " ".join(match.group(1).split())
    if re.match(_START, span):
      line = unfenced.count("\n", 0, match.start())
      command = _parse(span, f"{name}:{first_line + line}")
      if command and not any(c.text == command.text for c in found.values()):
        found[(line, command.program)] = command
  return [found[k] for k in sorted(found)]


def collect() -> list[Command]:
  """Every documented command, in README.md, docs/*.md and configs/*.py docstrings."""
  commands = []
  for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
    commands += _from_text(path.read_text(), str(path.relative_to(REPO)))
  for path in sorted((REPO / "configs").rglob("*.py")):
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    commands += _from_text(doc, str(path.relative_to(REPO)))
  return commands


@dataclasses.dataclass(frozen=True)
class Flag:
  """A ``--flag`` quoted on its own in prose, and the programs it is promised on."""

  where: str  # file:line
  name: str  # without the dashes and the value
  # The entry points a sentence "On `cljax.main`, `cljax.evaluate` and `cljax.bench`, ..."
  # promises it on; empty: some program of the repository must know it.
  programs: tuple[str, ...]


def collect_flags() -> list[Flag]:
  """Every ``--flag`` the README and docs/*.md quote in prose (outside commands and code
  blocks). A sentence that starts "On `<program>`, `<program>` and `<program>`," promises
  its flags on each program it names."""
  found = []
  for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
    text = path.read_text()
    text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for sentence in re.finditer(r"[^.]*(?:\.(?=\S)[^.]*)*\.?", text):
      body = sentence.group(0)
      promise = re.match(r"\s*On ((?:`[\w.]+`(?:,\s+|\s+and\s+)?)+),", body)
      programs = tuple(re.findall(r"`([\w.]+)`", promise.group(1))) if promise else ()
      for span in re.finditer(r"`(--[A-Za-z][\w-]*)[^`]*`", body):
        name = span.group(1)[2:]
        if not name.startswith("config"):  # Config keys are checked with their recipe.
          line = text.count("\n", 0, sentence.start() + span.start()) + 1
          found.append(Flag(f"{path.relative_to(REPO)}:{line}", name, programs))
  return found


def repository_flags() -> set[str]:
  """Flag names the repository's scripts define: benchmarks/*.py (absl or argparse) and
  launch/* (the launchers' own options)."""
  names = set()
  for path in sorted((REPO / "benchmarks").glob("*.py")):
    text = path.read_text()
    names |= set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", text))
    names |= set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", text))
  for path in sorted((REPO / "launch").iterdir()):
    names |= set(re.findall(r"--([a-z][\w-]*)", path.read_text()))
  return names


if __name__ == "__main__":
  for c in collect():
    print(f"{c.where:40s} {c.program:20s} {' '.join(c.args)}")
