"""Time-series archives (cljax.data.timeseries): .ts and .tsv files parsed to exact arrays, the
errors of malformed files, finding data sets (the 7 bundled with sktime among them), TS2Vec's
normalisations against sklearn, and its training-set preprocessing against the official code."""

import importlib.util
import os
import textwrap

import numpy as np
import pytest

from cljax.data import timeseries as ts

NAN = np.nan
HAS_SKTIME = importlib.util.find_spec("sktime") is not None
needs_sktime = pytest.mark.skipif(
  not HAS_SKTIME, reason="sktime is not installed: its wheel holds the bundled data sets"
)


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text).lstrip("\n"))
  return path


UNIVARIATE_TS = """
  # A comment, then the header in sktime's spelling.
  @problemName Toy
  @timeStamps false
  @missing true
  @univariate true
  @equalLength false
  @classLabel true b a

  @data
  1.0,2.0,3.0:b
  4,?,6,7,8:a
  # a comment among the cases
  -1.5e1,2:b
"""

MULTIVARIATE_TS = """
  @problemName Toy2
  @univariate false
  @dimensions 2
  @classLabel true x y
  @data
  1,2,3:10,20:x
  ?,5:6,7,8,9:y
"""


def test_read_ts_univariate_unequal_lengths_and_missing(tmp_path):
  x, y, meta = ts.read_ts(_write(tmp_path / "Toy_TRAIN.ts", UNIVARIATE_TS))
  expected = [[[1, 2, 3, NAN, NAN]], [[4, NAN, 6, 7, 8]], [[-15, 2, NAN, NAN, NAN]]]
  np.testing.assert_array_equal(x, np.array(expected, np.float32))
  assert x.dtype == np.float32
  assert y.tolist() == ["b", "a", "b"]
  assert meta["problem_name"] == "Toy"
  assert meta["dimensions"] == 1 and meta["univariate"]
  assert not meta["equal_length"] and meta["missing"]
  assert meta["class_labels"] == ("b", "a")  # header order, not sorted
  assert meta["series_length"] is None and not meta["target_label"]
  np.testing.assert_array_equal(meta["lengths"], [[3], [5], [2]])


def test_read_ts_multivariate_with_unequal_dimensions(tmp_path):
  x, y, meta = ts.read_ts(_write(tmp_path / "Toy2_TRAIN.ts", MULTIVARIATE_TS))
  expected = [
    [[1, 2, 3, NAN], [10, 20, NAN, NAN]],
    [[NAN, 5, NAN, NAN], [6, 7, 8, 9]],
  ]
  np.testing.assert_array_equal(x, np.array(expected, np.float32))
  assert y.tolist() == ["x", "y"]
  assert meta["dimensions"] == 2 and not meta["univariate"]
  np.testing.assert_array_equal(meta["lengths"], [[3, 2], [2, 4]])


def test_read_ts_infers_dimensions_and_reads_unlabelled_files(tmp_path):
  # No @dimensions: the first case tells; @classLabel false: no label after the last ':'.
  text = (
    "@univariate false\n@classLabel false\n@equalLength true\n@data\n1,2:3,4:5,6\n7,8:9,1:2,3\n"
  )
  x, y, meta = ts.read_ts(_write(tmp_path / "u.ts", text))
  assert y is None and meta["dimensions"] == 3 and meta["equal_length"] and not meta["missing"]
  np.testing.assert_array_equal(x[1], [[7, 8], [9, 1], [2, 3]])


@pytest.mark.parametrize(
  "text, line, message",
  [
    ("@dimensions 2\n@classLabel true a\n@data\n1,2:3:a\n1,2:a\n", 5, "1 dimensions, expected 2"),
    ("@univariate true\n@classLabel true a\n@data\n1,2:3:a\n", 4, "2 dimensions, expected 1"),
    ("@univariate true\n@classLabel true a b\n@data\n1,2:a\n1,2:c\n", 5, "label 'c' is not among"),
    ("@univariate true\n@classLabel true a\n@data\n1,2:a\n1,x2:a\n", 5, "non-numeric value 'x2'"),
    ("@univariate true\n@classLabel true a\n@data\n1,,2:a\n", 4, "non-numeric value ''"),
    ("@timeStamps true\n@data\n(0,1),(1,2):a\n", 1, "timestamped .ts data"),
    ("@univariate true\n@classLabel true a\n@data\n(0,1),(1,2):a\n", 4, "timestamped values"),
    ("@univariate true\n1,2,3\n@data\n", 2, "data before @data"),
    ("@univariate true\n@dimensions 3\n@data\n", 3, "@univariate true and @dimensions 3"),
    ("@classLabel true\n@data\n", 1, "must list the labels"),
    ("@missing maybe\n@data\n", 1, "expected true or false, got 'maybe'"),
    ("@dimensions two\n@data\n", 1, "one positive integer"),
    (
      "@univariate true\n@equalLength true\n@seriesLength 3\n@classLabel true a\n@data\n"
      "1,2,3:a\n1,2:a\n",
      7,
      "2 values, but the header says @equalLength true and @seriesLength 3",
    ),
  ],
)
def test_read_ts_refuses_malformed_files_naming_file_and_line(tmp_path, text, line, message):
  path = _write(tmp_path / "Bad_TRAIN.ts", text)
  with pytest.raises(ValueError, match="Bad_TRAIN.ts") as e:
    ts.read_ts(path)
  assert f"line {line}:" in str(e.value) and message in str(e.value), str(e.value)


def test_read_ts_refuses_missing_and_empty_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no .ts file"):
    ts.read_ts(tmp_path / "absent.ts")
  with pytest.raises(ValueError, match="holds no cases"):
    ts.read_ts(_write(tmp_path / "empty.ts", "@univariate true\n@data\n"))


def test_read_ucr_tsv_reads_labels_and_nan_padding(tmp_path):
  text = "1\t0.5\t-1\t2\n-1\t3\tNaN\tNaN\n\n2\t4\t5\n"  # a blank line, a short row
  x, y = ts.read_ucr_tsv(_write(tmp_path / "T_TRAIN.tsv", text))
  expected = [[[0.5, -1, 2]], [[3, NAN, NAN]], [[4, 5, NAN]]]
  np.testing.assert_array_equal(x, np.array(expected, np.float32))
  assert x.dtype == np.float32 and y.tolist() == ["1", "-1", "2"]


@pytest.mark.parametrize(
  "text, line, message",
  [
    ("1\t2\t3\n1\t2\tabc\n", 2, "non-numeric value 'abc' (columns are separated by tabs"),
    ("1\t2\n1,2,3\n", 2, "no tab-separated values after the label '1,2,3'"),
  ],
)
def test_read_ucr_tsv_refuses_malformed_rows(tmp_path, text, line, message):
  path = _write(tmp_path / "Bad_TEST.tsv", text)
  with pytest.raises(ValueError, match="Bad_TEST.tsv") as e:
    ts.read_ucr_tsv(path)
  assert f"line {line}:" in str(e.value) and message in str(e.value), str(e.value)


def _tsv_pair(folder, name="Toy", train_labels=("2", "-1", "10", "1"), test_labels=("1", "10")):
  rows = lambda labels: "".join(f"{label}\t{i}\t{i + 1}\n" for i, label in enumerate(labels))
  _write(folder / f"{name}_TRAIN.tsv", rows(train_labels))
  _write(folder / f"{name}_TEST.tsv", rows(test_labels))
  return folder


def test_load_dataset_tsv_pair_shares_labels_in_numeric_order(tmp_path):
  _tsv_pair(tmp_path / "Toy")
  data = ts.load_dataset("Toy", root=tmp_path)
  # Numeric order ("-1" < "1" < "2" < "10"), as TS2Vec's np.unique over numbers gives.
  assert data.class_names == ("-1", "1", "2", "10")
  np.testing.assert_array_equal(data.y_train, [2, 0, 3, 1])
  np.testing.assert_array_equal(data.y_test, [1, 3])
  assert data.x_train.shape == (4, 1, 2) and data.x_test.shape == (2, 1, 2)
  np.testing.assert_array_equal(data.x_test[1, 0], [1, 2])
  assert data.name == "Toy" and not data.multivariate and data.num_classes == 4
  assert data.source == str(tmp_path / "Toy")


def test_load_dataset_finds_files_in_root_or_in_a_named_folder(tmp_path):
  _tsv_pair(tmp_path)  # the files directly in root
  assert ts.load_dataset("Toy", root=tmp_path).source == str(tmp_path)
  _tsv_pair(tmp_path / "Named", name="Named")
  assert ts.load_dataset(tmp_path / "Named").name == "Named"


def test_load_dataset_prefers_ts_and_its_header_order_and_pads_splits_alike(tmp_path):
  _tsv_pair(tmp_path / "Toy")
  _write(tmp_path / "Toy" / "Toy_TRAIN.ts", UNIVARIATE_TS)
  test = "@univariate true\n@classLabel true b a\n@data\n1,2:a\n1,2,3,4,5,6,7:b\n"
  _write(tmp_path / "Toy" / "Toy_TEST.ts", test)
  data = ts.load_dataset("Toy", root=tmp_path)
  assert data.class_names == ("b", "a")
  np.testing.assert_array_equal(data.y_train, [0, 1, 0])
  np.testing.assert_array_equal(data.y_test, [1, 0])
  # The training file is at most 5 long, the test file 7: both come out 7 long.
  assert data.x_train.shape == (3, 1, 7) and data.x_test.shape == (2, 1, 7)
  assert np.isnan(data.x_train[:, :, 5:]).all()


def test_load_dataset_refuses_a_test_label_unseen_in_training(tmp_path):
  _tsv_pair(tmp_path / "Toy", test_labels=("1", "3"))
  with pytest.raises(ValueError, match=r"Toy_TEST.tsv: labels \['3'\] are not among the classes"):
    ts.load_dataset("Toy", root=tmp_path)


def test_load_dataset_refuses_unlabelled_ts_files(tmp_path):
  text = "@univariate true\n@classLabel false\n@data\n1,2\n"
  _write(tmp_path / "U" / "U_TRAIN.ts", text)
  _write(tmp_path / "U" / "U_TEST.ts", text)
  with pytest.raises(ValueError, match="has no class labels"):
    ts.load_dataset("U", root=tmp_path)


def test_load_dataset_not_found_says_where_it_looked_and_what_to_do(tmp_path):
  _write(tmp_path / "Toy" / "Toy_TRAIN.tsv", "1\t2\n")  # no test file: not a pair
  with pytest.raises(ValueError) as e:
    ts.load_dataset("Toy", root=tmp_path)
  message = str(e.value)
  assert isinstance(e.value, FileNotFoundError)
  assert str(tmp_path / "Toy") in message and "Toy_TRAIN.tsv/Toy_TEST.tsv" in message
  assert "GunPoint" in message and "JapaneseVowels" in message and "root=" in message
  with pytest.raises(ValueError, match="'NoSuchSet' is not a folder and not a bundled data set"):
    ts.load_dataset("NoSuchSet")


# The archive's numbers: (train shape, test shape, classes), checked against the files.
BUNDLED_SHAPES = {
  "GunPoint": ((50, 1, 150), (150, 1, 150), 2),
  "ItalyPowerDemand": ((67, 1, 24), (1029, 1, 24), 2),
  "ArrowHead": ((36, 1, 251), (175, 1, 251), 3),
  "OSULeaf": ((200, 1, 427), (242, 1, 427), 6),
  "ACSF1": ((100, 1, 1460), (100, 1, 1460), 10),
  "BasicMotions": ((40, 6, 100), (40, 6, 100), 4),
  "JapaneseVowels": ((270, 12, 29), (370, 12, 29), 9),
}


@needs_sktime
@pytest.mark.parametrize("name", ts.BUNDLED)
def test_bundled_datasets_load_with_the_archive_shapes(name):
  assert set(BUNDLED_SHAPES) == set(ts.BUNDLED)
  train_shape, test_shape, num_classes = BUNDLED_SHAPES[name]
  data = ts.load_dataset(name.lower())  # bundled names match in any case
  assert data.name == name
  assert data.x_train.shape == train_shape and data.x_test.shape == test_shape
  assert data.num_classes == num_classes and data.multivariate == (train_shape[1] > 1)
  # Every class occurs in training; test indices stay in range.
  np.testing.assert_array_equal(np.unique(data.y_train), np.arange(num_classes))
  assert 0 <= data.y_test.min() and data.y_test.max() < num_classes
  if name != "JapaneseVowels":
    assert not np.isnan(data.x_train).any() and not np.isnan(data.x_test).any()


@needs_sktime
def test_bundled_japanese_vowels_is_nan_padded_at_the_end():
  data = ts.load_dataset("JapaneseVowels")
  for x in (data.x_train, data.x_test):
    valid = ~np.isnan(x)
    lengths = valid.sum(axis=-1)  # (n, C); the valid values come first
    assert (lengths == lengths[:, :1]).all()
    np.testing.assert_array_equal(valid, np.arange(29) < lengths[..., None])
  lengths = np.concatenate([(~np.isnan(x[:, 0])).sum(-1) for x in (data.x_train, data.x_test)])
  assert lengths.min() == 7 and lengths.max() == 29
  # The training file alone is at most 26 long; load_dataset pads it to the test file's 29.
  assert ts.read_ts(os.path.join(data.source, "JapaneseVowels_TRAIN.ts"))[0].shape[-1] == 26


@needs_sktime
def test_read_ts_matches_sktime_and_the_bundled_tsv():
  from sktime.datasets import load_from_tsfile  # An independent parser of the same files.

  folder = ts.load_dataset("JapaneseVowels").source
  nested, labels = load_from_tsfile(
    os.path.join(folder, "JapaneseVowels_TEST.ts"), return_data_type="nested_univ"
  )
  x, y, meta = ts.read_ts(os.path.join(folder, "JapaneseVowels_TEST.ts"))
  assert y.tolist() == list(labels)
  for i in range(len(x)):
    for c in range(x.shape[1]):
      expected = nested.iloc[i, c].to_numpy().astype(np.float32)
      np.testing.assert_array_equal(x[i, c, : meta["lengths"][i, c]], expected)
  # The wheel also holds ArrowHead's training split as UCR .tsv: the same numbers.
  arrow = os.path.join(os.path.dirname(folder), "ArrowHead", "ArrowHead_TRAIN")
  x_ts, y_ts, _ = ts.read_ts(arrow + ".ts")
  x_tsv, y_tsv = ts.read_ucr_tsv(arrow + ".tsv")
  np.testing.assert_array_equal(x_ts, x_tsv)
  assert y_ts.tolist() == y_tsv.tolist()


def _series(rng, shape, nan_fraction=0.1, scales=None):
  """Normal values around 3, each channel scaled (by `scales`, else at random), 10% NaN."""
  scales = rng.uniform(0.5, 5, shape[1]) if scales is None else np.asarray(scales)
  x = rng.normal(3.0, 2.0, shape) * scales[None, :, None]
  x[rng.random(shape) < nan_fraction] = np.nan
  return x.astype(np.float32)


def test_normalize_ucr_uses_training_statistics_over_all_values_for_listed_sets():
  rng = np.random.default_rng(0)
  x_train = _series(rng, (8, 1, 30), scales=[2.0])
  x_test = _series(rng, (5, 1, 30), scales=[2.0]) + 7
  train, test = ts.normalize_ucr(x_train, x_test, "Chinatown")
  # load_UCR's formula, in float64 on the whole training set.
  mean, std = np.nanmean(x_train.astype(np.float64)), np.nanstd(x_train.astype(np.float64))
  np.testing.assert_allclose(train, (x_train - mean) / std, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(test, (x_test - mean) / std, rtol=1e-5, atol=1e-6)
  assert abs(np.nanmean(train)) < 1e-6 and abs(np.nanstd(train) - 1) < 1e-5
  assert np.nanmean(test) > 1  # test moved by the training statistics, not its own
  np.testing.assert_array_equal(np.isnan(train), np.isnan(x_train))
  np.testing.assert_array_equal(np.isnan(test), np.isnan(x_test))
  # A set the archive normalised already is left as it is.
  same_train, same_test = ts.normalize_ucr(x_train, x_test, "GunPoint")
  np.testing.assert_array_equal(same_train, x_train)
  np.testing.assert_array_equal(same_test, x_test)


def test_normalize_uea_matches_sklearn_standard_scaler_fitted_on_train():
  from sklearn.preprocessing import StandardScaler

  rng = np.random.default_rng(1)
  scales = [0.5, 2.0, 10.0]
  x_train = _series(rng, (6, 3, 20), scales=scales)
  x_test = _series(rng, (4, 3, 25), scales=scales) - 3 * np.array(scales)[:, None]
  train, test = ts.normalize_uea(x_train, x_test)
  # load_UEA's code, on TS2Vec's (n, T, C) layout; StandardScaler ignores NaN when fitting.
  as_rows = lambda x: x.transpose(0, 2, 1).reshape(-1, x.shape[1]).astype(np.float64)
  scaler = StandardScaler().fit(as_rows(x_train))
  back = lambda rows, x: rows.reshape(x.shape[0], x.shape[2], x.shape[1]).transpose(0, 2, 1)
  np.testing.assert_allclose(train, back(scaler.transform(as_rows(x_train)), x_train), atol=1e-5)
  np.testing.assert_allclose(test, back(scaler.transform(as_rows(x_test)), x_test), atol=1e-5)
  np.testing.assert_allclose(np.nanmean(train, axis=(0, 2)), 0, atol=1e-6)
  np.testing.assert_allclose(np.nanstd(train, axis=(0, 2)), 1, atol=1e-5)
  assert (np.nanmean(test, axis=(0, 2)) < -0.5).all()  # train's statistics, not test's
  np.testing.assert_array_equal(np.isnan(test), np.isnan(x_test))


def test_normalize_uea_constant_channel_and_empty_channel():
  x = np.ones((2, 2, 4), np.float32)
  x[:, 1] = np.arange(4)
  train, _ = ts.normalize_uea(x, x)
  np.testing.assert_array_equal(train[:, 0], 0)  # a zero std reads as 1, as in sklearn
  x[:, 1] = np.nan
  with pytest.raises(ValueError, match="a channel of the training set has no values"):
    ts.normalize_uea(x, x)


def test_prepare_applies_the_archive_rule():
  rng = np.random.default_rng(2)

  def make(name, channels):
    x_train, x_test = _series(rng, (6, channels, 10)), _series(rng, (3, channels, 10))
    labels = np.zeros(6, np.int32), np.zeros(3, np.int32)
    return ts.TimeSeriesDataset(name, x_train, labels[0], x_test, labels[1], ("a",), channels > 1)

  uea = make("BasicMotions", 3)
  np.testing.assert_array_equal(
    ts.prepare(uea).x_test, ts.normalize_uea(uea.x_train, uea.x_test)[1]
  )
  listed = make("PowerCons", 1)
  np.testing.assert_allclose(np.nanstd(ts.prepare(listed).x_train), 1, atol=1e-5)
  unlisted = make("GunPoint", 1)
  np.testing.assert_array_equal(ts.prepare(unlisted).x_train, unlisted.x_train)


# TS2Vec's utils.py and the start of TS2Vec.fit, transcribed on their (n, T, C) layout.
def _official_centerize(x):
  prefix_zeros = np.argmax(~np.isnan(x).all(axis=-1), axis=1)
  suffix_zeros = np.argmax(~np.isnan(x[:, ::-1]).all(axis=-1), axis=1)
  offset = (prefix_zeros + suffix_zeros) // 2 - prefix_zeros
  rows, column_indices = np.ogrid[: x.shape[0], : x.shape[1]]
  offset[offset < 0] += x.shape[1]
  column_indices = column_indices - offset[:, np.newaxis]
  return x[rows, column_indices]


def _official_split_with_nan(x, sections, axis=0):
  arrs = np.array_split(x, sections, axis=axis)
  target_length = arrs[0].shape[axis]
  for i in range(len(arrs)):
    pad_size = target_length - arrs[i].shape[axis]
    if pad_size > 0:
      npad = [(0, 0)] * arrs[i].ndim
      npad[axis] = (0, pad_size)
      arrs[i] = np.pad(arrs[i], pad_width=npad, mode="constant", constant_values=np.nan)
  return arrs


def _official_fit_preprocess(train_data, max_train_length):
  if max_train_length is not None:
    sections = train_data.shape[1] // max_train_length
    if sections >= 2:
      train_data = np.concatenate(_official_split_with_nan(train_data, sections, axis=1), axis=0)
  temporal_missing = np.isnan(train_data).all(axis=-1).any(axis=0)
  if temporal_missing[0] or temporal_missing[-1]:
    train_data = _official_centerize(train_data)
  return train_data[~np.isnan(train_data).all(axis=2).all(axis=1)]


def _ragged(rng, n=7, channels=2, length=12):
  """Series with leading and trailing NaN, a NaN inside, one channel NaN alone, one all-NaN."""
  x = rng.normal(size=(n, channels, length)).astype(np.float32)
  starts, ends = [0, 3, 0, 5, 2, 0, 0], [12, 12, 4, 9, 3, 12, 0]
  for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
    x[i, :, :start] = x[i, :, end:] = np.nan
  x[5, 1, :6] = np.nan  # one channel missing: the timestamp still has a value
  x[0, 0, 4] = np.nan
  return x


to_official = lambda x: x.transpose(0, 2, 1)  # (n, C, T) -> (n, T, C)


def test_centerize_vary_length_series_matches_the_official():
  x = _ragged(np.random.default_rng(3))
  got = ts.centerize_vary_length_series(x)
  np.testing.assert_array_equal(to_official(got), _official_centerize(to_official(x)))
  # The series with 3 leading NaN and none trailing moves right by -2 mod 12 = 10: its valid
  # values wrap around, NaN now at both ends (1 before, 2 after).
  np.testing.assert_array_equal(got[1], np.roll(x[1], -2, axis=-1))
  assert np.isnan(got[1, :, [0, 10, 11]]).all() and not np.isnan(got[1, :, 1:10]).any()
  np.testing.assert_array_equal(got[0], x[0])  # no NaN at either end: not moved


def _end_padded(rng, n=4, channels=2, length=12):
  """Series of lengths 12, 9, 6 and 3, NaN-padded at the end as the loaders pad them."""
  x = rng.normal(size=(n, channels, length)).astype(np.float32)
  for i in range(n):
    x[i, :, length - 3 * i :] = np.nan
  return x


@pytest.mark.parametrize("make", [_ragged, _end_padded])
@pytest.mark.parametrize("max_train_length", [None, 5, 6, 12])
def test_fit_preprocess_matches_the_official_fit(make, max_train_length):
  x = make(np.random.default_rng(4))
  got = ts.fit_preprocess(x, max_train_length)
  expected = _official_fit_preprocess(to_official(x), max_train_length)
  np.testing.assert_array_equal(to_official(got), expected)
  assert not np.isnan(got).all(axis=(1, 2)).any()  # _ragged's all-NaN series is gone
  if max_train_length == 5:  # 12 // 5 = 2 sections of 6
    assert got.shape[-1] == 6 and len(got) > len(x)


def test_fit_preprocess_centres_end_padded_series():
  got = ts.fit_preprocess(_end_padded(np.random.default_rng(5)), None)
  assert len(got) == 4
  # Length 6 of 12: rolled right by 3, so 3 NaN on each side.
  valid = ~np.isnan(got[2, 0])
  np.testing.assert_array_equal(valid, (np.arange(12) >= 3) & (np.arange(12) < 9))


def test_split_with_nan_pads_the_short_sections():
  x = np.arange(14, dtype=np.float32).reshape(1, 2, 7)
  parts = ts.split_with_nan(x, 3)  # lengths 3, 2, 2 -> all 3
  expected = _official_split_with_nan(to_official(x), 3, axis=1)
  for got, want in zip(parts, expected, strict=True):
    np.testing.assert_array_equal(to_official(got), want)
  np.testing.assert_array_equal(parts[2][0, 0], [5, 6, NAN])


def test_dataset_refuses_splits_of_different_shapes():
  x, y = np.zeros((2, 1, 5), np.float32), np.zeros(2, np.int32)
  with pytest.raises(ValueError, match=r"train and test series differ in shape: \(1, 5\)"):
    ts.TimeSeriesDataset("T", x, y, np.zeros((2, 2, 5), np.float32), y, ("a",), False)
  with pytest.raises(ValueError, match=r"x_test must be \(n, C, T\) with \(n,\) labels"):
    ts.TimeSeriesDataset("T", x, y, x, np.zeros(3, np.int32), ("a",), False)
