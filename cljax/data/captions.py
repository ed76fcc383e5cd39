"""Image-caption pairs for CLIP: caption sources and the grain pipeline of (view, token ids).

Two kinds of caption source, chosen by ``clip.captions``:

- ``"templates"``: a labelled image source (the ``data`` section: the shared CIFAR-10 or
  Fashion-MNIST copy, tfds, a class folder) captioned from its class names. Each image's
  candidates are every training template filled with its class name, with and without
  attribute words read off its pixels (a colour name for the centre of the image, "dark" or
  "bright"): "a picture of a dark brown horse.", "this is a ship.", ... The pipeline draws
  one per epoch. The eval split is captioned with *other* templates (``HELD_OUT_TEMPLATES``),
  one fixed caption per image, so retrieval is measured on unseen images and phrasings.
  Caveat: these captions say no more than the label (and two crude pixel statistics), so
  training on them is supervised classification in disguise and "zero-shot" accuracy on
  the same classes is not zero-shot transfer; it checks that the pipeline, the losses and
  the evaluation work, and it is what the tests and ``benchmarks/clip_quality.py`` use.
- ``"file"``: your own captions. ``data.source="folder"`` names the images (one folder per
  split, with or without class subfolders) and ``clip.caption_file`` /
  ``clip.eval_caption_file`` a CSV (columns ``image,caption``) or JSON Lines file
  (``{"image": ..., "caption": ...}`` or ``"captions": [...]``) of image paths, relative to
  the split's folder, and their captions. Several rows for one image give it several
  captions (one is drawn per epoch; all count as matches in retrieval).

``create_caption_iterator`` is ``pipeline.create_pretrain_iterator`` with one view: the same
global shuffle, per-process sharding and per-record generators (crop, flip, ``aug_seed``,
then the caption drawn from the record's rng), and the same resumable iterator state.
"""

from __future__ import annotations

import colorsys
import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from cljax import errors
from cljax.data import pipeline, sources
from cljax.data import tokenizer as tokenizer_lib
from cljax.data import views as views_lib

# "{a}": the noun phrase with its article ("an orange truck"); "{x}": without ("orange truck").
# No template is a prompt of the zero-shot ensemble (cljax.evaluate.zero_shot), which keeps those
# prompts unseen in training.
TRAIN_TEMPLATES = (
  "a picture of {a}.",
  "an image of {a}.",
  "{a} in a photo.",
  "a photo showing {a}.",
  "this is {a}.",
  "there is {a} in this image.",
  "a close-up image of {a}.",
  "a snapshot of {a}.",
  "a cropped photo of {a}.",
  "a low resolution image of {a}.",
  "my picture of {a}.",
  "an image that shows {a}.",
  "look at this {x}!",
  "{x}.",
  "the {x} in the middle of the image.",
  "a tiny picture of {a}.",
)
HELD_OUT_TEMPLATES = (
  "a shot of {a}.",
  "here is {a}.",
  "an example of {a}.",
  "a photograph of {a}.",
  "{a}, seen up close.",
  "someone took a picture of {a}.",
)
# Every attribute word: colour names for the centre of the image, then brightness.
COLOURS = ("black", "white", "gray", "red", "brown", "orange", "yellow", "green", "blue", "purple")
BRIGHTNESS = ("dark", "bright")
# The class-name sets the shipped vocabulary is trained on.
CORPUS_CLASSES = (
  ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
  sources.FASHION_MNIST_CLASSES,
)
# Size of the shipped BPE vocabulary (tokenizer.BUILTIN), trained by `train_builtin_vocab`.
BUILTIN_VOCAB_SIZE = 1024
CAPTION_SOURCES = ("templates", "file")  # The values of clip.captions.


def display_name(class_name: str) -> str:
  """A class label as words: lower case, the first of "a/b" alternatives ("T-shirt/top")."""
  return class_name.split("/")[0].replace("_", " ").strip().lower()


def with_article(phrase: str) -> str:
  return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def fill(template: str, class_name: str, attributes: Sequence[str] = ()) -> str:
  """``template`` with the noun phrase ``attributes + display_name(class_name)``."""
  phrase = " ".join([*attributes, display_name(class_name)])
  return template.format(a=with_article(phrase), x=phrase)


def image_attributes(image: np.ndarray) -> tuple[str, ...]:
  """Attribute words for a uint8 (H, W, 3) image: optional brightness, then a colour.

  The colour names the mean RGB of the central half of the image (in HSV: low saturation
  gives black, gray or white by value; otherwise a hue bin, dark oranges being brown); the
  brightness word marks mean luma below 0.33 ("dark") or above 0.63 ("bright"), each about
  a tenth of CIFAR-10, and is left out for black and white.
  """
  x = np.asarray(image, np.float32) / 255.0
  h, w = x.shape[:2]
  r, g, b = x[h // 4 : h - h // 4, w // 4 : w - w // 4].reshape(-1, 3).mean(axis=0)
  hue, saturation, value = colorsys.rgb_to_hsv(float(r), float(g), float(b))
  hue *= 360.0
  if saturation < 0.18:
    colour = "black" if value < 0.25 else "white" if value > 0.75 else "gray"
  elif hue < 15 or hue >= 330:
    colour = "red"
  elif hue < 45:
    colour = "brown" if value < 0.6 else "orange"
  elif hue < 70:
    colour = "yellow"
  elif hue < 165:
    colour = "green"
  elif hue < 260:
    colour = "blue"
  else:
    colour = "purple"
  if colour in ("black", "white"):
    return (colour,)
  luma = float(np.mean(x @ np.asarray([0.299, 0.587, 0.114], np.float32)))
  brightness = ("dark",) if luma < 0.33 else ("bright",) if luma > 0.63 else ()
  return (*brightness, colour)


def caption_corpus(templates: Sequence[str] = TRAIN_TEMPLATES) -> list[str]:
  """Every caption the templates can make for ``CORPUS_CLASSES``: the vocabulary's corpus."""
  attribute_sets = [()] + [(c,) for c in COLOURS]
  attribute_sets += [(b, c) for b in BRIGHTNESS for c in COLOURS if c not in ("black", "white")]
  return [
    fill(t, name, attrs)
    for classes in CORPUS_CLASSES
    for name in classes
    for t in templates
    for attrs in attribute_sets
  ]


def train_builtin_vocab(path: str) -> None:
  """Writes the shipped vocabulary (``cljax/data/vocab/captions_bpe.json``) to ``path``."""
  tokenizer_lib.train_bpe(caption_corpus(), BUILTIN_VOCAB_SIZE, path)


class TemplateCaptionSource:
  """A labelled image source whose examples also carry captions made from class names.

  Attributes:
    class_names: the image source's class names.
  """

  def __init__(
    self,
    images: Any,
    templates: Sequence[str] = TRAIN_TEMPLATES,
    *,
    class_names: Sequence[str] | None = None,
    attributes: bool = True,
    fixed_seed: int | None = None,
  ):
    """Wraps ``images`` (a random-access source of {"image", "label"}).

    Args:
      images: the image source.
      templates: caption templates with ``{a}`` or ``{x}`` (see ``fill``).
      class_names: names of the labels; default the source's ``class_names``.
      attributes: add the image's attribute words (captions with and without them; with
        ``fixed_seed``, always with them).
      fixed_seed: None gives every candidate caption (training draws one per epoch); an int
        gives one caption per image, its template drawn from ``(fixed_seed, index)`` (eval).

    Raises:
      ValueError: without class names or templates.
    """
    names = class_names if class_names is not None else getattr(images, "class_names", None)
    if not names:
      raise errors.DataError(
        f"clip.captions='templates' needs class names, and {images!r} has none; use a "
        "labelled source or clip.captions='file'."
      )
    if not templates:
      raise ValueError("templates must not be empty.")
    self.images, self.templates = images, tuple(templates)
    self.class_names, self.attributes, self.fixed_seed = tuple(names), attributes, fixed_seed

  def __len__(self) -> int:
    return len(self.images)

  def captions(self, index: int, image: np.ndarray, label: int) -> tuple[str, ...]:
    if not 0 <= label < len(self.class_names):
      raise ValueError(f"example {index} has label {label}; template captions need a class.")
    name = self.class_names[label]
    attrs = image_attributes(image) if self.attributes else ()
    if self.fixed_seed is not None:
      rng = np.random.default_rng([self.fixed_seed, index])
      return (fill(self.templates[rng.integers(len(self.templates))], name, attrs),)
    variants = [()] + ([attrs] if attrs else [])
    return tuple(fill(t, name, a) for t in self.templates for a in variants)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = dict(self.images[index])
    example["captions"] = self.captions(index, example["image"], int(example["label"]))
    return example

  def __repr__(self) -> str:
    return (
      f"TemplateCaptionSource({self.images!r}, templates={len(self.templates)}, "
      f"attributes={self.attributes}, fixed_seed={self.fixed_seed})"
    )


def read_caption_file(path: str) -> dict[str, list[str]]:
  """Image path -> captions from a CSV (``image,caption`` header) or JSON Lines file.

  Paths are normalised (``os.path.normpath``) and kept as written (relative to the images'
  folder, or absolute). Rows with an empty caption are ignored.
  """
  out: dict[str, list[str]] = {}
  if not os.path.isfile(path):
    raise errors.DataNotFoundError(f"caption file {path} does not exist")

  def add(image, texts, where):
    if not image:
      raise errors.DataError(f"{where}: no image path")
    for text in texts:
      if text and str(text).strip():
        out.setdefault(os.path.normpath(str(image)), []).append(str(text).strip())

  if path.endswith(".csv"):
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      if not {"image", "caption"} <= set(reader.fieldnames or ()):
        raise errors.DataError(f"{path}: the header must name 'image' and 'caption' columns")
      for i, row in enumerate(reader):
        add(row["image"], [row["caption"]], f"{path} row {i + 2}")
  elif path.endswith((".jsonl", ".json")):
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise errors.DataError(f"{path} line {i + 1} is not JSON: {e}") from e
          texts = row.get("captions") or [row.get("caption")]
          add(row.get("image"), texts, f"{path} line {i + 1}")
  else:
    raise errors.DataError(f"caption file {path} must end in .csv or .jsonl")
  return out


class CaptionFileSource:
  """An image source with file paths (``ImageFolderSource``) and their captions from a file."""

  def __init__(self, images: Any, caption_file: str):
    if not hasattr(images, "paths"):
      raise ValueError(
        f"clip.captions='file' needs images with file paths (data.source='folder'), got {images!r}."
      )
    table = read_caption_file(caption_file)
    root = getattr(images, "root", "")
    self.images, self.caption_file = images, caption_file
    self.class_names = getattr(images, "class_names", None)
    self._captions, missing = [], []
    for path in images.paths:
      texts = table.get(os.path.normpath(os.path.relpath(path, root))) or table.get(path)
      self._captions.append(tuple(texts or ()))
      if not texts:
        missing.append(path)
    if missing:
      raise errors.DataError(
        f"{len(missing)} of {len(images.paths)} images have no caption in {caption_file}, "
        f"e.g. {missing[:3]} (paths in the file are relative to {root})."
      )

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = dict(self.images[index])
    example["captions"] = self._captions[index]
    return example

  def __repr__(self) -> str:
    return f"CaptionFileSource({self.images!r}, caption_file={self.caption_file!r})"


def create_caption_source(config: ml_collections.ConfigDict, split: str, images: Any = None):
  """The caption source of ``config.clip.captions`` for ``split`` ("train" or "eval").

  Args:
    config: the run config (``data`` and ``clip`` sections).
    split: "train" or "eval".
    images: the split's image source, if already open; default ``sources.create_source``.
  """
  images = images if images is not None else sources.create_source(config.data, split)
  kind = config.clip.captions
  if kind == "templates":
    if split == "train":
      return TemplateCaptionSource(
        images, TRAIN_TEMPLATES, attributes=config.clip.caption_attributes
      )
    return TemplateCaptionSource(
      images,
      HELD_OUT_TEMPLATES,
      attributes=config.clip.caption_attributes,
      fixed_seed=config.train.seed,
    )
  if kind == "file":
    path = config.clip.caption_file if split == "train" else config.clip.eval_caption_file
    if not path:
      raise ValueError(
        f"clip.captions='file' needs clip.{'eval_' * (split != 'train')}caption_file."
      )
    return CaptionFileSource(images, os.path.expanduser(path))
  raise ValueError(f"clip.captions must be one of {CAPTION_SOURCES}, got {kind!r}.")


class CaptionedView(grain.transforms.RandomMap):
  """Example -> one random-resized-crop (+ flip) view and one caption's token ids.

  Draws, from the per-record generator and in this order: the crop, the flip coin,
  ``aug_seed`` (as ``pipeline.TwoViews`` does for its first view), then the caption.
  """

  def __init__(self, tokenizer: tokenizer_lib.CaptionTokenizer, views: views_lib.ViewSpec):
    self.tokenizer, self.views = tokenizer, views

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    view = pipeline.global_view(element["image"], rng, self.views)
    aug_seed = np.int32(rng.integers(0, 2**31 - 1))
    captions = element["captions"]
    text = captions[int(rng.integers(len(captions)))]
    return {
      "view_a": view,
      "tokens": self.tokenizer.encode(text)[0],
      "label": np.int32(element["label"]),
      "aug_seed": aug_seed,
    }


def create_caption_iterator(
  source: Any,
  tokenizer: tokenizer_lib.CaptionTokenizer,
  views: views_lib.ViewSpec,
  **stream: Any,
) -> pipeline.BatchIterator:
  """This process's iterator of (image view, caption tokens) batches.

  Shuffling, sharding over processes and per-record seeding are those of
  ``pipeline.create_pretrain_iterator``; each record gives one view and one caption.

  Args:
    source: a caption source ({"image", "label", "captions"}), e.g. ``create_caption_source``.
    tokenizer: turns the drawn caption into ``tokenizer.context_length`` ids.
    views: how the view is cut (open_clip: crop area 0.9-1, no flip, since captions may say
      left or right); local crops are not used.
    **stream: ``pipeline.StreamSpec``'s fields (``seed``: order, crops and captions;
      ``global_batch_size``: pairs per step over all processes; processes, workers, epochs,
      read threads).

  Returns:
    A ``BatchIterator`` of {"view_a": uint8 (b, S, S, 3), "tokens": int32 (b, L),
    "label": int32 (b,), "aug_seed": int32 (b,)}, b = global_batch_size // process_count,
    with get_state/set_state.
  """
  if views.num_local_crops:
    raise ValueError(
      f"CLIP's caption batches hold one view per image; set data.augment.num_local_crops=0 "
      f"(got {views.num_local_crops})."
    )
  return pipeline.augmented_batches(
    source,
    CaptionedView(tokenizer, views),
    views,
    pipeline.StreamSpec(**stream),
    kind="captions",
    signature={"tokenizer": tokenizer.fingerprint()},
  )


def create_tokenizer(config: ml_collections.ConfigDict) -> tokenizer_lib.CaptionTokenizer:
  """The run's tokenizer, checked against the text tower's embedding table."""
  tok = tokenizer_lib.create_tokenizer(config.clip.tokenizer, config.clip.context_length)
  if tok.eot_id != config.clip.eot_id:
    raise ValueError(
      f"the tokenizer {config.clip.tokenizer!r} ends captions with id {tok.eot_id}, but the "
      f"text tower pools at clip.eot_id={config.clip.eot_id}; set clip.eot_id={tok.eot_id}."
    )
  if tok.vocab_size > config.clip.vocab_size:
    raise ValueError(
      f"the tokenizer {config.clip.tokenizer!r} has {tok.vocab_size} tokens but the text "
      f"tower's embedding only clip.vocab_size={config.clip.vocab_size}; raise it."
    )
  return tok


def create_train_iterator(
  config: ml_collections.ConfigDict,
  images: Any,
  views: views_lib.ViewSpec,
  process_index: int = 0,
  process_count: int = 1,
  read_threads: int | None = None,
) -> pipeline.BatchIterator:
  """The CLIP training iterator of ``config`` over the training image source ``images``
  (``read_threads``: as :func:`create_caption_iterator`)."""
  return create_caption_iterator(
    create_caption_source(config, "train", images),
    create_tokenizer(config),
    views,
    seed=config.train.seed,
    global_batch_size=config.data.global_batch_size,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.data.num_workers,
    read_threads=read_threads,
  )
