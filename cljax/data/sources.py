"""Random-access image sources (tfds ArrayRecord, image folders, arrays, synthetic) for grain."""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cljax import errors
from cljax.data.folder import IMAGE_EXTENSIONS, ImageFolderSource, SkippedFile  # noqa: F401
from cljax.data.images import Example, _example, array_to_rgb, decode_image, pil_to_rgb  # noqa: F401

FASHION_MNIST_CLASSES = tuple(
  "T-shirt/top|Trouser|Pullover|Dress|Coat|Sandal|Shirt|Sneaker|Bag|Ankle boot".split("|")
)
# The embedded Fashion-MNIST subset, written by tools/make_embedded_data.py.
EMBEDDED_FILES = {
  "train": ("fmnist-train-images-idx3-ubyte.gz", "fmnist-train-labels-idx1-ubyte.gz"),
  "test": ("fmnist-test-images-idx3-ubyte.gz", "fmnist-test-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _default_tfds_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))


def _prepare_hint(name: str, data_dir: str) -> str:
  if name.split("/")[0].split(":")[0] == "imagenet2012":
    return (
      f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {data_dir}/downloads/manual "
      f"and run, once, on a machine with TensorFlow installed (building needs it, reading does "
      f"not): tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record"
    )
  return f"prepare it with: tfds build {name} --data_dir={data_dir} --file_format=array_record"


class TfdsSource:
  """A prepared tfds data set in ArrayRecord format, read with `tfds.data_source` (no TensorFlow).

  Attributes:
    class_names: the label names when the label feature is a `ClassLabel`, else None.
  """

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | os.PathLike | None,
    image_key: str = "image",
    label_key: str | None = "label",
  ):
    """Opens `name` at `split` under `data_dir`, never downloading or building it.

    Args:
      name: tfds name, optionally with config and version (`imagenet2012:5.1.0`).
      split: tfds split expression (`train`, `validation`, `train[:90%]`).
      data_dir: the tfds data folder; None means $TFDS_DATA_DIR or ~/tensorflow_datasets.
      image_key: feature holding the image.
      label_key: feature holding the label; None (or absent from the data) gives label -1.

    Raises:
      FileNotFoundError: data_dir does not exist, or the data set is not prepared there.
      ValueError: tfds has no data set called `name`.
    """
    import tensorflow_datasets as tfds  # Imported here: most runs never need it.

    self.name, self.split = name, split
    self.data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir or _default_tfds_dir())))
    self.image_key, self.label_key = image_key, label_key
    if not os.path.isdir(self.data_dir):
      raise errors.DataNotFoundError(
        f"tfds data_dir {self.data_dir} does not exist; {_prepare_hint(name, self.data_dir)}"
      )
    try:
      builder = tfds.builder(name, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      # tfds's own message lists every registered data set; this one stays readable.
      raise errors.DataError(
        f"unknown tfds data set {name!r} (searched the tfds registry and {self.data_dir}); "
        "see https://www.tensorflow.org/datasets/catalog for names"
      ) from None
    try:
      # download=False: a missing data set must fail here, not start a download or a build.
      self._ds = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
    except Exception as e:
      if not builder.is_prepared():
        raise errors.DataNotFoundError(
          f"tfds data set {name!r} is not prepared in {builder.data_dir}; "
          f"{_prepare_hint(name, self.data_dir)}"
        ) from e
      raise errors.DataError(
        f"cannot open split {split!r} of tfds data set {name!r} in {builder.data_dir} "
        f"(grain needs file_format=array_record): {e}"
      ) from e
    features = builder.info.features
    label = features[label_key] if label_key and label_key in features else None
    self.class_names = tuple(label.names) if hasattr(label, "names") else None
    self._raw = None  # The undecoded records, opened by the first encoded().

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> Example:
    record = self._ds[int(index)]
    label = record.get(self.label_key) if self.label_key else None
    return _example(array_to_rgb(np.asarray(record[self.image_key])), label)

  def encoded(self, index: int) -> tuple[bytes, np.int32]:
    """The stored image file's bytes and label, undecoded (``decode.py``'s decode-only path)."""
    if self._raw is None:
      import tensorflow_datasets as tfds

      # The same records, read with the image left as its encoded bytes.
      self._raw = tfds.data_source(
        self.name,
        split=self.split,
        data_dir=self.data_dir,
        download=False,
        decoders={self.image_key: tfds.decode.SkipDecoding()},
      )
    record = self._raw[int(index)]
    label = record.get(self.label_key) if self.label_key else None
    return bytes(record[self.image_key]), np.int32(-1 if label is None else label)

  def __repr__(self) -> str:
    return (
      f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
      f"num_examples={len(self)})"
    )


class EncodedImages:
  """A sequence of encoded images stored back to back: image i is data[offsets[i]:offsets[i+1]]."""

  def __init__(self, data: np.ndarray, offsets: np.ndarray):
    self.data, self.offsets = np.asarray(data, np.uint8), np.asarray(offsets, np.int64)
    if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[-1] > len(self.data):
      raise ValueError(f"bad offsets {self.offsets} for {len(self.data)} bytes of images")

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, index: int) -> np.ndarray:
    return self.data[self.offsets[index] : self.offsets[index + 1]]


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (MNIST format), gzipped when its name ends with .gz."""
  path = os.fspath(path)
  with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise errors.DataError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
  ndim = raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  array = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise errors.DataError(f"{path}: header says {shape}, file holds {array.size} values")
  return array.reshape(shape)


def _meta_class_names(path: str) -> tuple[str, ...] | None:
  # The shared data sets keep their class names in a meta.json beside the files.
  meta = os.path.join(os.path.dirname(path), "meta.json")
  if os.path.isfile(meta):
    with open(meta) as f:
      classes = json.load(f).get("classes")
    return tuple(classes) if classes else None
  return None


def _pick(arrays: Any, keys: Sequence[str], path: str, required: bool = True) -> np.ndarray | None:
  for key in keys:
    if key in arrays:
      return arrays[key]
  if required:
    raise errors.DataError(
      f"{path} has none of the keys {list(keys)} (found {list(arrays.keys())})"
    )
  return None


class ArraySource:
  """Images held in memory: a (N, H, W[, C]) uint8/uint16 array, or EncodedImages decoded lazily.

  Built from arrays directly or with `from_npz` (decoded or encoded), `from_idx`, `embedded`.
  A source built from files pickles as its file names (grain workers re-read the files
  instead of receiving copies of the arrays).

  Attributes:
    class_names: label names, when known.
  """

  def __init__(
    self,
    images: np.ndarray | EncodedImages,
    labels: np.ndarray | None = None,
    *,
    class_names: Sequence[str] | None = None,
    origin: str = "arrays",
  ):
    """Wraps `images` (decoded or encoded) and (N,) `labels` (None: unlabelled, -1).

    `origin` says where the arrays came from, for repr. Raises ValueError for float images or
    mismatched lengths.
    """
    if isinstance(images, np.ndarray) and images.dtype not in (np.uint8, np.uint16):
      raise errors.DataError(
        f"images must be uint8 or uint16 (scale floats first), got {images.dtype}"
      )
    if labels is not None and len(labels) != len(images):
      raise errors.DataError(f"{len(images)} images but {len(labels)} labels")
    self.images = images
    self.labels = None if labels is None else np.asarray(labels, np.int32)
    self.class_names = tuple(class_names) if class_names is not None else None
    self.origin = origin
    self._rebuild: tuple[Callable[..., ArraySource], tuple[Any, ...]] | None = None

  @classmethod
  def from_npz(cls, path: str | os.PathLike) -> ArraySource:
    """Loads a NumPy .npz of decoded or encoded images, told apart by their keys.

    Decoded: `images`/`labels` (or `image`/`label`, or `x`/`y`). Encoded (like the shared
    CIFAR-10): `jpeg` (every file's bytes, concatenated), `offsets` (N+1) and `labels`;
    images are decoded one at a time, when read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise errors.DataNotFoundError(f"no .npz file {path}: check data.data_dir and the split")
    try:
      with np.load(path) as f:
        if "offsets" in f:
          images = EncodedImages(_pick(f, ("jpeg", "encoded"), path), f["offsets"])
        else:
          images = _pick(f, ("images", "image", "x"), path)
        labels = _pick(f, ("labels", "label", "y"), path, required=False)
    except errors.DataError:
      raise
    # NumPy reads a file that is not an archive as a pickle, and refuses it with ValueError.
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
      raise errors.DataError(f"cannot read {path} as a NumPy .npz file: {e}") from e
    kind = "encoded_npz" if isinstance(images, EncodedImages) else "npz"
    source = cls(images, labels, class_names=_meta_class_names(path), origin=f"{kind}:{path}")
    source._rebuild = (cls.from_npz, (path,))
    return source

  @classmethod
  def from_idx(
    cls,
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
  ) -> ArraySource:
    """Loads MNIST-style IDX files (`train-images-idx3-ubyte[.gz]`, `...-labels-idx1-ubyte`)."""
    images_path = os.fspath(images_path)
    labels_path = None if labels_path is None else os.fspath(labels_path)
    labels = None if labels_path is None else read_idx(labels_path)
    names = class_names or _meta_class_names(images_path)
    source = cls(read_idx(images_path), labels, class_names=names, origin=f"idx:{images_path}")
    source._rebuild = (cls.from_idx, (images_path, labels_path, names))
    return source

  @classmethod
  def embedded(cls, split: str = "train") -> ArraySource:
    """The Fashion-MNIST subset shipped in the package: 'train' (10,000) or 'test' (2,000)."""
    if split not in EMBEDDED_FILES:
      raise ValueError(f"embedded split must be one of {sorted(EMBEDDED_FILES)}, got {split!r}")
    folder = importlib.resources.files("cljax.data") / "embedded"
    images_name, labels_name = EMBEDDED_FILES[split]
    with (
      importlib.resources.as_file(folder / images_name) as images,
      importlib.resources.as_file(folder / labels_name) as labels,
    ):
      source = cls.from_idx(images, labels, FASHION_MNIST_CLASSES)
    source.origin = f"embedded:fashion_mnist/{split}"
    source._rebuild = (cls.embedded, (split,))
    return source

  def __reduce_ex__(self, protocol):
    if self._rebuild is not None:
      return self._rebuild
    return super().__reduce_ex__(protocol)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> Example:
    label = None if self.labels is None else self.labels[index]
    if isinstance(self.images, EncodedImages):
      return _example(decode_image(self.images[index], f"{self.origin}[{index}]"), label)
    return _example(array_to_rgb(self.images[index]), label)

  def encoded(self, index: int) -> tuple[np.ndarray, np.int32]:
    """An encoded image's bytes and label, undecoded (``decode.py``'s decode-only path).

    Raises:
      TypeError: the images are decoded arrays (``is_encoded`` is False).
    """
    if not self.is_encoded:
      raise TypeError(f"{self!r} holds decoded arrays, not encoded images")
    label = np.int32(-1 if self.labels is None else self.labels[index])
    return self.images[index], label

  @property
  def is_encoded(self) -> bool:
    """Whether ``encoded`` has bytes to give (decoded arrays have none)."""
    return isinstance(self.images, EncodedImages)

  def __repr__(self) -> str:
    return f"ArraySource(origin={self.origin!r}, num_examples={len(self)})"


class SyntheticSource:
  """Deterministic random images for benchmarks: example i depends only on (seed, i)."""

  def __init__(self, num_examples: int, image_size: int, num_classes: int = 10, seed: int = 0):
    if num_examples <= 0 or image_size <= 0 or num_classes <= 0:
      raise ValueError(f"need positive sizes, got {num_examples=}, {image_size=}, {num_classes=}")
    self.num_examples, self.image_size = num_examples, image_size
    self.num_classes, self.seed = num_classes, seed
    self.class_names = tuple(f"class_{i}" for i in range(num_classes))

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Example:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    rng = np.random.default_rng([self.seed, index])
    size = (self.image_size, self.image_size, 3)
    return _example(rng.integers(0, 256, size, np.uint8), rng.integers(self.num_classes))

  def __repr__(self) -> str:
    return (
      f"SyntheticSource(num_examples={self.num_examples}, image_size={self.image_size}, "
      f"num_classes={self.num_classes}, seed={self.seed})"
    )


class PreparedSource:
  """A pre-resized JPEG copy of a source, written by ``python -m cljax.data.prepare``.

  The copy of a split is ``<prefix>-00000-of-000NN.array_record`` shards (ArrayRecord,
  group_size 1: random access) and ``<prefix>.json`` (metadata, written last), where
  ``prefix = PreparedSource.file_prefix(split)``. Each record is a 4-byte little-endian
  int32 label followed by the JPEG file's bytes (``pack``/``unpack``). The shards are read
  with grain's ``ArrayRecordDataSource``, which pickles as its file names (grain workers open
  their own readers).

  Attributes:
    class_names: the original source's label names, when it had them.
    short_side, quality: the settings the copy was written with (0: sizes kept).
    metadata: the whole ``<prefix>.json``.
  """

  LABEL_BYTES = 4

  def __init__(self, directory: str | os.PathLike, split: str = "train"):
    """Opens the copy of `split` in `directory`.

    Args:
      directory: the folder given to ``cljax.data.prepare --out_dir``.
      split: the split's name in the config it was written from (``data.train_split`` /
        ``data.eval_split``, e.g. "train", "validation").

    Raises:
      FileNotFoundError: no complete copy of the split is there (the message says how to write
        one), or a shard the metadata lists is missing.
      ValueError: the shards hold a different number of records than the metadata says.
    """
    import grain  # Imported here: the other sources do not need it.

    self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    self.split, self.prefix = split, self.file_prefix(split)
    meta_path = os.path.join(self.directory, f"{self.prefix}.json")
    if not os.path.isfile(meta_path):
      started = os.path.isfile(os.path.join(self.directory, f"{self.prefix}.in_progress.json"))
      state = "is incomplete (stopped while writing)" if started else "was not found"
      raise errors.DataNotFoundError(
        f"the prepared copy of split {split!r} {state}: no {meta_path}. Write it (a rerun "
        f"finishes a stopped one) with: python -m cljax.data.prepare "
        f"--config=<the recipe, reading the original source> --out_dir={self.directory} "
        f"--split=train (or --split=eval, whichever the recipe names {split!r})"
      )
    with open(meta_path) as f:
      self.metadata = json.load(f)
    paths = [os.path.join(self.directory, name) for name in self.metadata["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise errors.DataNotFoundError(
        f"{len(missing)} shard(s) listed in {meta_path} are missing, the first {missing[0]}; "
        "rerun cljax.data.prepare with the same settings to rewrite them"
      )
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) != self.metadata["num_records"]:
      raise errors.DataError(
        f"{self.directory}: the shards of {split!r} hold {len(self._records)} records, "
        f"{meta_path} says {self.metadata['num_records']}"
      )
    names = self.metadata.get("class_names")
    self.class_names = tuple(names) if names is not None else None
    self.short_side, self.quality = self.metadata["short_side"], self.metadata["quality"]

  @staticmethod
  def file_prefix(split: str) -> str:
    """The file name prefix of a split's copy: `split` with runs of characters other than
    letters, digits, ``.``, ``_`` and ``-`` replaced by ``_`` and ``._-`` stripped from the
    ends ("train[:90%]" -> "train_90", "imagenet/val" -> "imagenet_val"; "." -> "all")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", split).strip("._-") or "all"

  @staticmethod
  def pack(label: int, data: bytes) -> bytes:
    """One record: `label` as a 4-byte little-endian int32, then the JPEG bytes."""
    return np.int32(label).astype("<i4").tobytes() + bytes(data)

  @classmethod
  def unpack(cls, record: bytes) -> tuple[bytes, np.int32]:
    """A record's JPEG bytes and label (``pack``'s inverse)."""
    label = np.frombuffer(record, "<i4", 1)[0]
    return record[cls.LABEL_BYTES :], np.int32(label)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Example:
    data, label = self.encoded(index)
    return _example(decode_image(data, f"{self!r}[{index}]"), label)

  def encoded(self, index: int) -> tuple[bytes, np.int32]:
    """The stored JPEG's bytes and label, undecoded (``decode.py``'s decode-only path)."""
    return self.unpack(self._records[int(index)])

  def __repr__(self) -> str:
    return (
      f"PreparedSource(directory={self.directory!r}, split={self.split!r}, "
      f"num_examples={len(self)}, short_side={self.short_side}, quality={self.quality})"
    )


ImageSource = TfdsSource | ImageFolderSource | ArraySource | SyntheticSource | PreparedSource


def _split_name(data_config: Any, split: str) -> str:
  return data_config.get(f"{split}_split") or ("train" if split == "train" else "test")


def _data_path(data_config: Any, *parts: str) -> str:
  data_dir = data_config.get("data_dir")
  if not data_dir:
    raise errors.DataError(f"data.source={data_config.get('source')!r} needs data.data_dir")
  return os.path.join(os.path.expanduser(data_dir), *parts)


def _npz_path(data_config: Any, split: str) -> str:
  name = _split_name(data_config, split)
  return _data_path(data_config, name if name.endswith(".npz") else f"{name}.npz")


def _idx_source(data_config: Any, split: str) -> ArraySource:
  prefix = _split_name(data_config, split)
  gzipped = _data_path(data_config, f"{prefix}-images-idx3-ubyte.gz")
  images = gzipped if os.path.exists(gzipped) else gzipped[: -len(".gz")]
  if not os.path.exists(images):
    raise errors.DataNotFoundError(
      f"no IDX images for split {prefix!r}: neither {gzipped} nor {images}"
    )
  labels = images.replace("-images-idx3-", "-labels-idx1-")
  return ArraySource.from_idx(images, labels if os.path.exists(labels) else None)


def _synthetic_source(data_config: Any, split: str) -> SyntheticSource:
  return SyntheticSource(
    num_examples=data_config.get("num_examples") or 1024,
    image_size=data_config.get("source_image_size") or data_config.get("image_size") or 32,
    num_classes=data_config.get("num_classes") or 10,
    # Different seeds keep the eval images apart from the training ones.
    seed=(data_config.get("seed") or 0) + (split == "eval"),
  )


_FACTORIES: dict[str, Callable[[Any, str], ImageSource]] = {
  "tfds": lambda c, s: TfdsSource(
    c.get("name"),
    _split_name(c, s),
    c.get("data_dir") or None,
    image_key=c.get("image_key") or "image",
    label_key=c.get("label_key", "label"),
  ),
  "folder": lambda c, s: ImageFolderSource(
    _data_path(c, _split_name(c, s)), strict=bool(c.get("strict"))
  ),
  "npz": lambda c, s: ArraySource.from_npz(_npz_path(c, s)),
  "encoded_npz": lambda c, s: ArraySource.from_npz(_npz_path(c, s)),
  "idx": _idx_source,
  "synthetic": _synthetic_source,
  "embedded": lambda c, s: ArraySource.embedded("train" if s == "train" else "test"),
  "prepared": lambda c, s: PreparedSource(_data_path(c), _split_name(c, s)),
  # Time series (data.modality = "series"): a UCR/UEA set, bundled or in data_dir.
  "timeseries": lambda c, s: _timeseries_source(c, s),
}


def _timeseries_source(data_config: Any, split: str) -> Any:
  from cljax.data import timeseries  # Here: image runs never import it.

  return timeseries.create_source(data_config, split)


def create_source(data_config: Any, split: str) -> ImageSource:
  """Builds the source a data config names.

  Fields read (missing optional ones take the defaults shown):
    source: one of "tfds", "folder", "npz", "encoded_npz", "idx", "synthetic", "embedded",
      "prepared" (a pre-resized copy written by ``python -m cljax.data.prepare``).
    name: tfds name ("tfds" only).
    data_dir: tfds data folder ("tfds"; None = $TFDS_DATA_DIR or ~/tensorflow_datasets), or
      the folder holding the split folders/files (all file-based types).
    train_split / eval_split: which split `split` means. tfds: a split expression ("train",
      "validation"); folder: a subfolder of data_dir; npz/encoded_npz: data_dir/<name>.npz;
      idx: the file prefix ("train", "t10k"); prepared: the copy's split name. Defaults
      "train" / "test". Ignored by "synthetic" and "embedded" (whose eval split is its
      2,000-image test set).
    image_key / label_key: tfds feature names (default "image" / "label"; label_key None =
      unlabelled).
    strict: "folder" only: unreadable files are errors (default False: skipped and logged).
    num_examples, num_classes, source_image_size (else image_size), seed: "synthetic" only
      (defaults 1024, 10, 32, 0).

  Args:
    data_config: the `data` section of the config (a ConfigDict, or anything with .get).
    split: "train" or "eval".

  Returns:
    A random-access source of {"image": uint8 (H, W, 3), "label": int32} examples.

  Raises:
    ValueError: an unknown source type or split; errors of the chosen source.
  """
  kind = data_config.get("source")
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if kind not in _FACTORIES:
    raise errors.DataError(f"data.source must be one of {sorted(_FACTORIES)}, got {kind!r}")
  return _FACTORIES[kind](data_config, split)
