"""Command-line plumbing of ``cljax.main`` and ``cljax.evaluate``: user errors as one line.

Light on purpose (absl and the standard library only): a config file that cannot be loaded
or a mistyped ``--config.a.b=v`` is answered before JAX is imported.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from absl import app, flags

from cljax import errors


def exit_with(error: Exception | str) -> NoReturn:
  """A user error: its message alone on stderr, exit status 1 (no traceback to read past)."""
  print(f"Error: {error}", file=sys.stderr)
  sys.exit(1)


@contextlib.contextmanager
def user_errors(*also: type[Exception]) -> Iterator[None]:
  """Errors the user's input caused (``errors.UserInputError``, and the types in ``also``)
  leave as one ``Error:`` line and exit status 1; anything else keeps its traceback."""
  try:
    yield
  except (errors.UserInputError, *also) as e:
    exit_with(e)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, for ``app.run(main, flags_parser=cli.parse_flags)``.

  ml_collections reports a missing config file only when the config is first read, as a
  chained ``OSError``, and an unknown ``--config.`` key as three chained tracebacks; both
  become one ``Error:`` line and exit status 1 here. Other flag errors keep absl's answer.
  """
  try:
    rest = app.parse_flags_with_usage(argv)
  except OSError as e:  # An override of a config that failed to load.
    exit_with(_load_failure(argv, e))
  except (KeyError, AttributeError, TypeError) as e:  # An override of a key the config lacks.
    exit_with(_unknown_key(argv, e))
  try:
    flags.FLAGS["config"].value.keys()  # A config that failed to load raises on any access.
  except OSError as e:
    exit_with(_load_failure(argv, e))
  return rest


def _config_argument(argv: list[str]) -> str:
  """The value of the last ``--config=PATH[:ARGS]`` (or ``--config PATH``) of ``argv``."""
  value = ""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.removeprefix("--config=")
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _load_failure(argv: list[str], error: OSError) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"--config={_config_argument(argv)} cannot be loaded: {lines[-1]}"


def _load_config(argv: list[str]) -> Any:
  """The config file's ``get_config(...)``, loaded again (the failed parse kept none)."""
  path, *args = _config_argument(argv).split(":", 1)
  spec = importlib.util.spec_from_file_location("cljax_cli_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def _unknown_key(argv: list[str], error: Exception) -> str:
  """The first ``--config.a.b=v`` of ``argv`` whose key the config lacks, and the nearest."""
  config = _load_config(argv)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg.removeprefix("--config.").split("=", 1)[0].split(".")
    node, parents = config, []
    for part in path:
      where = ".".join(parents)
      if not hasattr(node, "keys"):
        return f"{arg}: {where} is a value ({node!r}), not a section; set --config.{where}=..."
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = f" Did you mean {'.'.join([*parents, close[0]])!r}?" if close else ""
        return f"{arg}: {where or 'the config'} has no key {part!r}.{hint}"
      node, parents = node[part], [*parents, part]
  return f"unknown config key: {str(error).splitlines()[0]}"
