"""UCR/UEA time-series classification archives (.ts, .tsv) in NumPy, prepared as TS2Vec does.

Arrays are (n, channels, time) float32; a series shorter than the longest is padded at the end
with NaN, and a missing value is NaN too: TS2Vec's encoder masks NaN timestamps, so this is the
form it trains on. Four layers, each usable alone:

- reading: `read_ts` (the UEA/sktime `.ts` format), `read_ucr_tsv` (the UCR 2018 `.tsv` files);
- finding and labelling: `load_dataset` (a folder the user names, or the 7 data sets the sktime
  wheel bundles, found without importing sktime) -> `TimeSeriesDataset`;
- normalising: `normalize_ucr`, `normalize_uea` and `prepare` (the archive's rule), ported from
  TS2Vec's `datautils.load_UCR` / `load_UEA` (github.com/yuezhihan/ts2vec);
- the training-set preprocessing of `TS2Vec.fit` before its random crops: `fit_preprocess`
  (`split_with_nan`, `centerize_vary_length_series`, dropping all-NaN series).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from cljax import errors

# The data sets the sktime wheel ships in sktime/datasets/data/NAME/NAME_{TRAIN,TEST}.ts.
BUNDLED = tuple(
  "GunPoint ItalyPowerDemand ArrowHead OSULeaf ACSF1 BasicMotions JapaneseVowels".split()
)

# The UCR 2018 data sets that are not z-normalised in the archive, copied in order from
# TS2Vec's `datautils.load_UCR`: only these are normalised there (with the training set's
# mean and std over all values, "to keep the amplitude information"); the others are used as
# stored, every series already z-normalised by the archive.
UCR_NOT_NORMALIZED = frozenset(
  """
  AllGestureWiimoteX AllGestureWiimoteY AllGestureWiimoteZ BME Chinatown Crop
  EOGHorizontalSignal EOGVerticalSignal Fungi GestureMidAirD1 GestureMidAirD2
  GestureMidAirD3 GesturePebbleZ1 GesturePebbleZ2 GunPointAgeSpan GunPointMaleVersusFemale
  GunPointOldVersusYoung HouseTwenty InsectEPGRegularTrain InsectEPGSmallTrain
  MelbournePedestrian PickupGestureWiimoteZ PigAirwayPressure PigArtPressure PigCVP PLAID
  PowerCons Rock SemgHandGenderCh2 SemgHandMovementCh2 SemgHandSubjectCh2
  ShakeGestureWiimoteZ SmoothSubspace UMD
  """.split()
)

# TS2Vec's train.py default for --max-train-length.
MAX_TRAIN_LENGTH = 3000


class DatasetNotFoundError(errors.DataNotFoundError, ValueError):
  """No NAME_TRAIN/NAME_TEST pair where `load_dataset` looked (also a ValueError: a bad name)."""


@dataclasses.dataclass(frozen=True)
class TimeSeriesDataset:
  """One archive data set: both splits, labels as class indices, and where it came from.

  Attributes:
    name: the data set's name (`GunPoint`).
    x_train, x_test: (n, C, T) float32; both splits padded with NaN to the same T.
    y_train, y_test: (n,) int32 indices into `class_names`.
    class_names: the labels as written in the files, in index order.
    multivariate: whether C > 1 (which selects the UEA normalisation in `prepare`).
    source: the folder the files were read from.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  class_names: tuple[str, ...]
  multivariate: bool
  source: str = ""

  def __post_init__(self):
    for split in ("train", "test"):
      x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
      if x.ndim != 3 or y.shape != (len(x),):
        raise errors.DataError(
          f"{self.name}: x_{split} must be (n, C, T) with (n,) labels, got {x.shape} and {y.shape}"
        )
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise errors.DataError(
        f"{self.name}: train and test series differ in shape: {self.x_train.shape[1:]} (train) "
        f"vs {self.x_test.shape[1:]} (test); both splits must have the same channels and length"
      )

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


# ---------------------------------------------------------------------------------------------
# Reading


def _bool(value: str, where: str) -> bool:
  if value.lower() not in ("true", "false"):
    raise errors.DataError(f"{where}: expected true or false, got {value!r}")
  return value.lower() == "true"


def _parse_header(line: str, header: dict, where: str) -> None:
  """Reads one `@key value...` line into `header` (keys lower-cased, as sktime reads them)."""
  key, *values = line[1:].split()
  key = key.lower()
  if key in ("timestamps", "missing", "univariate", "equallength", "targetlabel"):
    if len(values) != 1:
      raise errors.DataError(f"{where}: @{key} takes one value (true or false), got {values}")
    header[key] = _bool(values[0], where)
    if key == "timestamps" and header[key]:
      raise errors.DataError(
        f"{where}: timestamped .ts data (@timeStamps true, values written (t,v)) is unsupported; "
        "resample it to a regular grid and write plain values"
      )
  elif key in ("dimensions", "serieslength"):
    if len(values) != 1 or not values[0].isdigit() or int(values[0]) < 1:
      raise errors.DataError(f"{where}: @{key} takes one positive integer, got {values}")
    header[key] = int(values[0])
  elif key == "classlabel":
    if not values or (_bool(values[0], where) and len(values) == 1):
      raise errors.DataError(f"{where}: @classLabel true must list the labels, got {values}")
    header[key] = tuple(values[1:]) if _bool(values[0], where) else None
  elif key == "problemname":
    header[key] = " ".join(values)
  # Other keys (sktime adds some over time) carry nothing the arrays need.


def _parse_values(tokens: Sequence[str], where: str, layout: str) -> np.ndarray:
  """Numbers, with `?` (and `NaN`) for a missing value; `layout` tells how to write a line."""
  values = np.empty(len(tokens), np.float64)
  for i, token in enumerate(tokens):
    try:
      values[i] = np.nan if token.strip() == "?" else float(token)
    except ValueError:
      raise errors.DataError(
        f"{where}: non-numeric value {token.strip()!r} ({layout}; '?' or NaN for missing)"
      ) from None
  return values


def _dimensions(header: dict, where: str) -> int | None:
  """The header's number of dimensions, None when only the data can tell."""
  dims = header.get("dimensions")
  if header.get("univariate") and dims not in (None, 1):
    raise errors.DataError(f"{where}: the header says @univariate true and @dimensions {dims}")
  return 1 if header.get("univariate") and dims is None else dims


def _parse_case(line: str, header: dict, num_dims: int, where: str):
  """One data line: its dimensions' values and its label (None in an unlabelled file)."""
  parts = line.split(":")
  labelled = header.get("classlabel") is not None or header.get("targetlabel", False)
  label = parts.pop().strip() if labelled else None
  if len(parts) != num_dims:
    raise errors.DataError(
      f"{where}: {len(parts)} dimensions, expected {num_dims} (dimensions are separated by ':'"
      + (", the label comes after the last ':')" if labelled else ")")
    )
  classes = header.get("classlabel")
  if classes is not None and label not in classes:
    raise errors.DataError(
      f"{where}: label {label!r} is not among the @classLabel labels {list(classes)}"
    )
  if "(" in line:
    raise errors.DataError(
      f"{where}: timestamped values (t,v) are unsupported; write plain comma-separated values"
    )
  layout = "values are separated by ',', dimensions by ':'"
  series = [_parse_values(part.split(","), where, layout) for part in parts]
  if header.get("equallength") and "serieslength" in header:
    for series_dim in series:
      if len(series_dim) != header["serieslength"]:
        raise errors.DataError(
          f"{where}: {len(series_dim)} values, but the header says @equalLength true and "
          f"@seriesLength {header['serieslength']}"
        )
  return series, label


def _pad_cases(cases: list[list[np.ndarray]]) -> np.ndarray:
  """Stacks cases (each a list of C 1-D arrays) into (n, C, T_max) float32, NaN at the end."""
  length = max(len(values) for case in cases for values in case)
  x = np.full((len(cases), len(cases[0]), length), np.nan, np.float32)
  for i, case in enumerate(cases):
    for d, values in enumerate(case):
      x[i, d, : len(values)] = values
  return x


def read_ts(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict]:
  """Reads a UEA/sktime `.ts` file: a header of `@key value` lines, `@data`, one case a line.

  A case line holds its dimensions separated by ':', each dimension's values by ',', and the
  label after the last ':' (when `@classLabel true` or `@targetlabel true`). `?` is a missing
  value; cases, and dimensions of one case, may differ in length. `#` lines are comments.

  Args:
    path: the `.ts` file.

  Returns:
    `(x, y, meta)`: x the (n, C, T_max) float32 values, NaN where missing and after the end of
    a shorter series; y the (n,) labels as written (str), None in an unlabelled file; meta a
    dict with `problem_name`, `dimensions`, `univariate`, `equal_length` and `missing` (found
    in the data), `series_length` (header, or None), `class_labels` (header order, or None),
    `target_label` (a regression target instead of a class), `lengths` ((n, C) int64: the
    number of values of each dimension of each case) and `path`.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError (`errors.DataError`): a malformed header or data line (the message gives the
      file and line), timestamped data (unsupported), or no cases.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.DataNotFoundError(f"no .ts file {path}")
  header, cases, labels, num_dims, in_data = {}, [], [], None, False
  with open(path, encoding="utf-8-sig") as f:
    for lineno, raw in enumerate(f, start=1):
      line, where = raw.strip(), f"{path}, line {lineno}"
      if not line or line.startswith("#"):
        continue
      if not in_data and line.startswith("@"):
        if line.lower() == "@data":
          in_data, num_dims = True, _dimensions(header, where)
        else:
          _parse_header(line, header, where)
        continue
      if not in_data:
        raise errors.DataError(f"{where}: data before @data (header lines start with '@')")
      # A file that does not say how many dimensions it has: the first case tells.
      labelled = header.get("classlabel") is not None or header.get("targetlabel", False)
      num_dims = num_dims or line.count(":") + 1 - labelled
      series, label = _parse_case(line, header, num_dims, where)
      cases.append(series)
      labels.append(label)
  if not cases:
    raise errors.DataError(f"{path} holds no cases (is the @data line there, and data after it?)")
  x = _pad_cases(cases)
  lengths = np.array([[len(s) for s in case] for case in cases], np.int64)
  meta = {
    "problem_name": header.get("problemname"),
    "dimensions": num_dims,
    "univariate": num_dims == 1,
    "equal_length": bool((lengths == lengths.flat[0]).all()),
    "missing": bool(any(np.isnan(s).any() for case in cases for s in case)),
    "series_length": header.get("serieslength"),
    "class_labels": header.get("classlabel"),
    "target_label": header.get("targetlabel", False),
    "lengths": lengths,
    "path": path,
  }
  y = None if labels[0] is None else np.array(labels, dtype=str)
  return x, y, meta


def read_ucr_tsv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads a UCR 2018 `NAME_TRAIN.tsv` / `NAME_TEST.tsv`: one series a line, label first.

  Columns are tab-separated; `NaN` entries are missing values, which is how the archive stores
  its unequal-length sets (padded at the end). Rows of different widths are NaN-padded too.

  Args:
    path: the `.tsv` file.

  Returns:
    `(x, y)`: x the (n, 1, T) float32 series, y the (n,) labels as written ("1", "-1").

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError (`errors.DataError`): a row with no values or a non-numeric value (the message
      gives the file and line), or no rows.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.DataNotFoundError(f"no .tsv file {path}")
  cases, labels = [], []
  with open(path, encoding="utf-8-sig") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      where = f"{path}, line {lineno}"
      label, *columns = raw.rstrip().split("\t")
      if not columns:
        raise errors.DataError(
          f"{where}: no tab-separated values after the label {label.strip()[:40]!r} (UCR .tsv rows "
          "are: label<TAB>value<TAB>value...)"
        )
      cases.append([_parse_values(columns, where, "columns are separated by tabs")])
      labels.append(label.strip())
  if not cases:
    raise errors.DataError(f"{path} holds no rows")
  return _pad_cases(cases), np.array(labels, dtype=str)


# ---------------------------------------------------------------------------------------------
# Finding and labelling


def _sort_labels(labels: Sequence[str]) -> tuple[str, ...]:
  """Distinct labels in numeric order when all are numbers ("-1" < "2" < "10"), else natural.

  Numeric order is the order TS2Vec's `np.unique` gives the labels pandas read as numbers.
  """
  distinct = sorted(set(labels))
  try:
    return tuple(sorted(distinct, key=float))
  except ValueError:
    natural = lambda s: [
      (0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s)
    ]
    return tuple(sorted(distinct, key=natural))


def _encode(labels: np.ndarray, class_names: tuple[str, ...], path: str) -> np.ndarray:
  index = {name: i for i, name in enumerate(class_names)}
  unknown = sorted(set(labels.tolist()) - index.keys())
  if unknown:
    raise errors.DataError(
      f"{path}: labels {unknown} are not among the classes {list(class_names)} (taken from the "
      "training file); train and test must share their labels"
    )
  return np.array([index[label] for label in labels.tolist()], np.int32)


def _bundled_folder(name: str) -> tuple[str, str | None]:
  """The bundled name spelled as sktime spells it, and its folder (None without sktime)."""
  name = {b.lower(): b for b in BUNDLED}.get(name.lower(), name)
  # find_spec locates the package without importing it (sktime's import is slow and heavy).
  spec = importlib.util.find_spec("sktime") if name in BUNDLED else None
  if spec is None or not spec.submodule_search_locations:
    return name, None
  return name, os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


def _find_pair(folder: str, name: str) -> tuple[str, str, str] | None:
  """(train, test, extension) of the first complete pair in `folder`: .ts first, then .tsv."""
  for ext in ("ts", "tsv"):
    train, test = (os.path.join(folder, f"{name}_{split}.{ext}") for split in ("TRAIN", "TEST"))
    if os.path.isfile(train) and os.path.isfile(test):
      return train, test, ext
  return None


def _read_split(path: str, ext: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
  """(x, labels, header class labels or None) of one split."""
  if ext == "tsv":
    x, y = read_ucr_tsv(path)
    return x, y, None
  x, y, meta = read_ts(path)
  if y is None or meta["target_label"]:
    raise errors.DataError(
      f"{path} has no class labels (@classLabel false, or a regression @targetlabel): "
      "load_dataset needs classification data; read it with read_ts instead"
    )
  return x, y, meta["class_labels"]


def _load_pair(name: str, train: str, test: str, ext: str) -> TimeSeriesDataset:
  x_train, labels_train, header_classes = _read_split(train, ext)
  x_test, labels_test, _ = _read_split(test, ext)
  if x_train.shape[1] != x_test.shape[1]:
    raise errors.DataError(
      f"{train} has {x_train.shape[1]} dimensions but {test} has {x_test.shape[1]}"
    )
  class_names = header_classes or _sort_labels(labels_train.tolist())
  # One length for both splits: the encoder sees one shape, and padding is NaN either way.
  length = max(x_train.shape[-1], x_test.shape[-1])
  return TimeSeriesDataset(
    name=name,
    x_train=pad_nan_to_target(x_train, length),
    y_train=_encode(labels_train, class_names, train),
    x_test=pad_nan_to_target(x_test, length),
    y_test=_encode(labels_test, class_names, test),
    class_names=tuple(class_names),
    multivariate=x_train.shape[1] > 1,
    source=os.path.dirname(train),
  )


def load_dataset(
  name_or_dir: str | os.PathLike, root: str | os.PathLike | None = None
) -> TimeSeriesDataset:
  """Loads a UCR/UEA data set's `NAME_TRAIN`/`NAME_TEST` pair (`.ts`, else `.tsv`).

  Where it looks: in `name_or_dir` itself when that is a folder (NAME is its base name); with
  `root`, in `root/NAME/` then `root/` (the archives unpack either way); else among `BUNDLED`,
  in the sktime wheel's data folder (sktime is located, never imported).

  Labels become indices into `class_names`: the `@classLabel` order of a `.ts` training file
  that lists them, else the training labels sorted (numerically when all are numbers). Both
  splits are padded with NaN to the longer of their lengths.

  Args:
    name_or_dir: a data set name (`GunPoint`) or the folder holding its files.
    root: a folder holding the archive (`.../Univariate_ts`) or the data set's files.

  Returns:
    The data set, unnormalised (see `prepare`).

  Raises:
    ValueError (`DatasetNotFoundError`): no pair of files where it looked.
    ValueError (`errors.DataError`): a malformed file, or a test label the training file lacks.
  """
  path = os.path.expanduser(os.fspath(name_or_dir))
  if root is None and os.path.isdir(path):
    name, folders = os.path.basename(os.path.normpath(path)), [path]
  elif root is not None:
    root = os.path.expanduser(os.fspath(root))
    name, folders = path, [os.path.join(root, path), root]
  else:
    name, bundled = _bundled_folder(path)
    folders = [bundled] if bundled else []
  for folder in folders:
    found = _find_pair(folder, name)
    if found:
      return _load_pair(name, *found)
  raise DatasetNotFoundError(_not_found_message(name, folders))


def _not_found_message(name: str, folders: list[str]) -> str:
  looked = (
    f"looked for {name}_TRAIN.ts/{name}_TEST.ts and {name}_TRAIN.tsv/{name}_TEST.tsv in "
    + ", ".join(folders)
    if folders
    else f"{name!r} is not a folder and not a bundled data set"
  )
  sktime = "" if importlib.util.find_spec("sktime") else " (install sktime to get them)"
  return (
    f"time-series data set {name!r} not found: {looked}. Bundled with sktime{sktime}: "
    f"{', '.join(BUNDLED)}. For another data set, point at its files: "
    f"load_dataset({name!r}, root='/path/to/Univariate_ts') or "
    f"load_dataset('/path/to/{name}')"
  )


# ---------------------------------------------------------------------------------------------
# Normalising


def _standardize(x_train: np.ndarray, x_test: np.ndarray, axes: tuple[int, ...]):
  """(x - mean) / std with the training set's NaN-ignoring statistics over `axes`.

  Population std (ddof 0) and a zero std read as 1, as sklearn's `StandardScaler` does; the
  statistics are computed in float64, as TS2Vec computes them.
  """
  train = x_train.astype(np.float64)
  valid = ~np.isnan(train)
  count = valid.sum(axis=axes, keepdims=True)
  if (count == 0).any():
    raise errors.DataError(
      "cannot normalise: a channel of the training set has no values (all NaN)"
    )
  mean = np.where(valid, train, 0).sum(axis=axes, keepdims=True) / count
  var = np.where(valid, (train - mean) ** 2, 0).sum(axis=axes, keepdims=True) / count
  std = np.sqrt(var)
  std[std == 0] = 1
  scale = lambda x: ((x.astype(np.float64) - mean) / std).astype(np.float32)
  return scale(x_train), scale(x_test)


def normalize_ucr(
  x_train: np.ndarray, x_test: np.ndarray, name: str
) -> tuple[np.ndarray, np.ndarray]:
  """TS2Vec's UCR rule (`datautils.load_UCR`): normalise only the sets the archive did not.

  The UCR archive z-normalises every series of most data sets; the 34 in
  `UCR_NOT_NORMALIZED` it stores raw. TS2Vec leaves the first as they are, and normalises the
  second with one mean and one std over all the training set's values (NaN ignored), applied
  to both splits: per-series z-normalisation would erase the amplitudes that tell some of
  their classes apart. `name` must be spelled as the archive spells it.

  Args:
    x_train, x_test: (n, 1, T) series, NaN where missing or padded.
    name: the data set's archive name.

  Returns:
    (x_train, x_test) float32; unchanged (but for dtype) when `name` is not in the list.
  """
  if name not in UCR_NOT_NORMALIZED:
    return x_train.astype(np.float32), x_test.astype(np.float32)
  return _standardize(x_train, x_test, axes=tuple(range(x_train.ndim)))


def normalize_uea(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """TS2Vec's UEA rule (`datautils.load_UEA`): a per-channel scaler fitted on the training set.

  The official code fits sklearn's `StandardScaler` to the training set reshaped to
  (n * T, C), every timestamp a sample, and transforms both splits with it: each channel gets
  the training set's mean and std over all its timestamps. The UEA archive is not normalised,
  and its channels (accelerometer, gyroscope, ...) have unrelated scales. NaN values are left
  out of the statistics and stay NaN, as `StandardScaler` does.

  Args:
    x_train, x_test: (n, C, T) series.

  Returns:
    (x_train, x_test) float32.
  """
  return _standardize(x_train, x_test, axes=(0, 2))


def prepare(dataset: TimeSeriesDataset) -> TimeSeriesDataset:
  """Normalises a loaded data set as TS2Vec does for its archive.

  Multivariate sets come from the UEA archive: `normalize_uea`. Univariate sets come from
  the UCR archive (as `.tsv`, or as the `.ts` copies sktime bundles): `normalize_ucr`, which
  changes only the data sets the archive left unnormalised. For a univariate set of your own
  that is not normalised, call `normalize_uea` (with one channel it is the same rule).

  Args:
    dataset: as `load_dataset` returns it.

  Returns:
    A copy with normalised `x_train` and `x_test`.
  """
  if dataset.multivariate:
    x_train, x_test = normalize_uea(dataset.x_train, dataset.x_test)
  else:
    x_train, x_test = normalize_ucr(dataset.x_train, dataset.x_test, dataset.name)
  return dataclasses.replace(dataset, x_train=x_train, x_test=x_test)


# ---------------------------------------------------------------------------------------------
# TS2Vec's preprocessing of the training set (its arrays are (n, T, C); these take (n, C, T))


def pad_nan_to_target(x: np.ndarray, length: int) -> np.ndarray:
  """Pads the last (time) axis with NaN at the end up to `length`; longer arrays are returned.

  Port of TS2Vec's `utils.pad_nan_to_target` (`both_side=False`): its padding for unequal
  lengths, which the encoder masks.
  """
  if x.shape[-1] >= length:
    return x
  return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])], constant_values=np.nan)


def split_with_nan(x: np.ndarray, sections: int) -> list[np.ndarray]:
  """Cuts the time axis into `sections` near-equal parts, the shorter ones NaN-padded at the end.

  Port of TS2Vec's `utils.split_with_nan` (with `np.array_split`, the first parts are the
  longest; every part is padded to the first's length).
  """
  parts = np.array_split(x, sections, axis=-1)
  return [pad_nan_to_target(p, parts[0].shape[-1]) for p in parts]


def centerize_vary_length_series(x: np.ndarray) -> np.ndarray:
  """Rolls each series in time so that its valid span sits in the middle of the window.

  Port of TS2Vec's `utils.centerize_vary_length_series`: with p leading and s trailing
  timestamps at which every channel is NaN, series i is rolled right by (p + s) // 2 - p
  (modulo T), which moves NaN padding from one end to both. TS2Vec's random crops then see
  the valid values away from the edges. An all-NaN series is left in place.

  Args:
    x: (n, C, T).

  Returns:
    (n, C, T), each series rolled.
  """
  present = ~np.isnan(x).all(axis=1)  # (n, T): a timestamp with any value
  prefix = np.argmax(present, axis=1)
  suffix = np.argmax(present[:, ::-1], axis=1)
  offset = ((prefix + suffix) // 2 - prefix) % x.shape[-1]
  columns = (np.arange(x.shape[-1])[None, :] - offset[:, None]) % x.shape[-1]  # (n, T)
  return np.take_along_axis(x, columns[:, None, :], axis=-1)


def fit_preprocess(x: np.ndarray, max_train_length: int | None = MAX_TRAIN_LENGTH) -> np.ndarray:
  """What `TS2Vec.fit` does to the training set before its batches and random crops.

  In order, as the official `fit`: (1) with T // max_train_length = k >= 2, cut the time axis
  into k sections (`split_with_nan`) and stack them as separate series (all series' first
  sections, then all second sections, ...); (2) if any series is all-NaN at the first or at
  the last timestamp, centre every series (`centerize_vary_length_series`); (3) drop series
  with no value at all. (Per batch, `fit` then crops to `max_train_length` at a random
  offset, and draws its two overlapping crops: that belongs to the training step.)

  Args:
    x: (n, C, T) training series, NaN where missing or padded.
    max_train_length: the longest series to train on; None never splits. TS2Vec's `train.py`
      uses 3000.

  Returns:
    (n', C, T') float32.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 3:
    raise ValueError(f"expected (n, C, T) series, got shape {x.shape}")
  if max_train_length is not None and x.shape[-1] // max_train_length >= 2:
    x = np.concatenate(split_with_nan(x, x.shape[-1] // max_train_length), axis=0)
  missing = np.isnan(x).all(axis=1).any(axis=0)  # (T,): some series is all-NaN there
  if missing[0] or missing[-1]:
    x = centerize_vary_length_series(x)
  return x[~np.isnan(x).all(axis=(1, 2))]


# ---------------------------------------------------------------------------------------------
# A source for the run: one split, as (T, C) series


class SeriesSource:
  """One split of a UCR/UEA set as random-access ``{"series": (T, C), "label"}`` examples.

  The run's source for ``data.modality = "series"`` (``data.source = "timeseries"``): the
  set's arrays normalised by the archive's rule (``prepare``), time first as the encoders
  take them (``series``: (n, T, C) float32, NaN where missing or padded), which evaluation
  reads. ``train_series`` is what training draws from: the training split after TS2Vec's
  training preprocessing (``fit_preprocess``: varying-length series centred) where that
  keeps every series, else ``series``; the official code also evaluates the series as
  loaded, not as centred.
  """

  def __init__(
    self,
    series: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    name: str,
    train_series: np.ndarray | None = None,
  ):
    self.series = np.ascontiguousarray(series, np.float32)
    self.labels = np.asarray(labels, np.int32)
    self.class_names = tuple(class_names)
    self.name = name
    self.train_series = self.series if train_series is None else train_series.astype(np.float32)
    if self.train_series.shape != self.series.shape:
      raise ValueError(
        f"train_series {self.train_series.shape} must have the shape of series {self.series.shape}."
      )

  def __len__(self) -> int:
    return len(self.series)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"series": self.series[index], "label": self.labels[index]}

  @property
  def series_shape(self) -> tuple[int, int]:
    """(T, C) of one example."""
    return tuple(self.series.shape[1:])

  def __repr__(self) -> str:
    return f"SeriesSource({self.name}, {len(self)} x {self.series_shape})"


@functools.lru_cache(maxsize=8)
def _prepared(name: str, root: str | None) -> TimeSeriesDataset:
  return prepare(load_dataset(name, root))


def create_source(data_config: Any, split: str) -> SeriesSource:
  """The ``data.source = "timeseries"`` source: ``data.name`` (a bundled set's name, or the
  files' NAME) read from ``data.data_dir`` when set, else from the bundled sets; ``split``
  "train" or "eval" (the archive's TEST split)."""
  name = data_config.get("name")
  if not name:
    raise errors.DataError(
      "data.name must name a time-series set: one of the bundled "
      f"{', '.join(BUNDLED)}, or the NAME of NAME_TRAIN.ts/.tsv files in data.data_dir."
    )
  dataset = _prepared(name, data_config.get("data_dir") or None)
  time_first = lambda x: np.transpose(x, (0, 2, 1))
  if split != "train":
    return SeriesSource(
      time_first(dataset.x_test), dataset.y_test, dataset.class_names, dataset.name
    )
  x = dataset.x_train
  fitted = fit_preprocess(x)
  # Where series were split or dropped, labels no longer apply: train on them as loaded.
  fitted = fitted if fitted.shape == x.shape else x
  return SeriesSource(
    time_first(x),
    dataset.y_train,
    dataset.class_names,
    dataset.name,
    train_series=time_first(fitted),
  )
