"""The one exception type of the data package: a problem in an input file, reported as `path:line: problem` on a
single line so that a user can open the file at that line and fix it (or turn on skipping where a builder allows it).
It is raised while files are parsed in plain Python, before TensorFlow Datasets writes anything."""
from __future__ import annotations

import os


class DataError(ValueError):
  """Bad input data. `str(err)` is one line: `<file>:<line>: <problem>`."""

  def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
    self.path = os.fspath(path)
    self.line = line
    self.problem = " ".join(str(problem).split())  # one line, whatever the caller passed
    where = f"{self.path}:{line}" if line is not None else self.path
    super().__init__(f"{where}: {self.problem}")
