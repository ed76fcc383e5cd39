"""Errors a user's input causes, which the command line reports as one ``Error:`` line.

Data that is missing or unreadable, a caption or tokenizer file that is wrong, a config
value that cannot work with the data: the message says what was wrong and what to do, and
``python -m cljax.main``, ``cljax.evaluate``, ``cljax.bench`` and ``cljax.data.prepare``
print it without a traceback and exit with status 1 (``cli.user_errors``). Anything else
keeps its traceback: it is a failure to report, not an input to fix.

Each class also derives from the built-in error it refines, so ``except FileNotFoundError``
or ``except ValueError`` in a caller's code keeps working.
"""

from __future__ import annotations


class UserInputError(Exception):
  """Input the user can fix: the entry points print the message alone and exit 1."""


class DataNotFoundError(UserInputError, FileNotFoundError):
  """A data folder, file or prepared data set that does not exist where the config says."""


class DataError(UserInputError, ValueError):
  """Data, or a data setting, that cannot be used as it is (empty, unreadable, mismatched)."""
