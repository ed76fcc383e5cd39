"""Caption tokenizer: byte-level BPE (HF ``tokenizers``), fixed-length ids framed by SOT and EOT.

``CaptionTokenizer.encode`` turns captions into (n, context_length) int32 arrays laid out as
CLIP's text tower expects::

    [SOT, t_1, ..., t_k, EOT, PAD, ..., PAD]     k <= context_length - 2

A caption longer than that keeps its first ``context_length - 2`` tokens and still ends in
EOT (CLIP's truncation). Text is NFC-normalised and lower-cased (as CLIP's ``basic_clean``
and ``lower``); byte-level BPE then encodes any string, words outside the training corpus
falling back to shorter pieces down to single bytes, so ``decode(encode(t))`` returns the
normalised ``t`` whenever it fits the context.

Vocabularies, named by ``clip.tokenizer``:
- ``"builtin"``: a small BPE vocabulary trained with :func:`train_bpe` on the caption corpus
  of ``cljax.data.captions`` (class names of CIFAR-10 and Fashion-MNIST in the training
  templates, with attribute words), shipped in the package (``data/vocab/captions_bpe.json``).
  It suits the shared-image caption set; real captions need a real vocabulary.
- a path to a ``tokenizers`` JSON file (e.g. one written by :func:`train_bpe` on your corpus);
- ``"hf:NAME"``: ``tokenizers.Tokenizer.from_pretrained(NAME)`` from the Hugging Face Hub,
  e.g. ``"hf:openai/clip-vit-base-patch16"``, CLIP's own 49,408-token BPE (needs network on
  first use; the file is cached).
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from cljax import errors

PAD, SOT, EOT = "<pad>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, SOT, EOT)  # Ids 0, 1, 2 in vocabularies that train_bpe writes.
BUILTIN = "builtin"
BUILTIN_FILE = "captions_bpe.json"


def train_bpe(
  texts: Iterable[str], vocab_size: int, path: str | os.PathLike | None = None
) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE vocabulary on ``texts`` (lower-cased), optionally saving it.

  The 256 byte symbols are always in the vocabulary, so any text can be encoded. Training is
  deterministic: the same texts give the same file.

  Args:
    texts: the corpus, one caption per item.
    vocab_size: the vocabulary's size at most (3 special tokens + 256 bytes + merges).
    path: where to write the JSON file, or None.

  Returns:
    The trained ``tokenizers.Tokenizer``.
  """
  if vocab_size < len(SPECIAL_TOKENS) + 256:
    raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}, got {vocab_size}.")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=2,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(list(texts), trainer)
  if path is not None:
    tok.save(os.fspath(path))
  return tok


class CaptionTokenizer:
  """A ``tokenizers.Tokenizer`` producing fixed-length SOT ... EOT id arrays.

  Pickles as its JSON text, so grain worker processes rebuild it.

  Attributes:
    context_length: L, the length of every encoded row.
    vocab_size: ids are in ``[0, vocab_size)``.
    sot_id / eot_id / pad_id: the framing and padding ids.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, context_length: int):
    if context_length < 3:
      raise ValueError(f"context_length must be >= 3 (SOT, a token, EOT), got {context_length}.")
    self._tok, self.context_length = tokenizer, int(context_length)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    if ids[SOT] is None or ids[EOT] is None:
      raise ValueError(f"the vocabulary lacks the special tokens {SOT!r} and {EOT!r}.")
    self.sot_id, self.eot_id = ids[SOT], ids[EOT]
    # CLIP pads with 0; under the causal mask and EOT pooling the pad id never matters.
    self.pad_id = ids[PAD] if ids[PAD] is not None else 0
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_file(cls, path: str | os.PathLike, context_length: int) -> CaptionTokenizer:
    return cls(tokenizers.Tokenizer.from_file(os.fspath(path)), context_length)

  @classmethod
  def builtin(cls, context_length: int) -> CaptionTokenizer:
    """The BPE vocabulary trained on the shared-image caption corpus, shipped in the package."""
    resource = importlib.resources.files("cljax.data") / "vocab" / BUILTIN_FILE
    return cls(tokenizers.Tokenizer.from_str(resource.read_text(encoding="utf-8")), context_length)

  def __reduce__(self):
    return (_from_json, (self._tok.to_str(), self.context_length))

  def tokenize(self, text: str) -> list[int]:
    """The ids of ``text`` alone: no SOT, EOT, padding or truncation."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    """(n, context_length) int32 ids: SOT, the (truncated) caption, EOT, then padding."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    for row, enc in zip(out, encodings, strict=True):
      ids = [self.sot_id, *enc.ids[: self.context_length - 2], self.eot_id]
      row[: len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of one row of ids: what lies between SOT and the first EOT."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.eot_id in ids:
      ids = ids[: ids.index(self.eot_id)]
    else:  # Not from encode: drop trailing padding only (the pad id may be a real token).
      while ids and ids[-1] == self.pad_id:
        ids.pop()
    if ids and ids[0] == self.sot_id:
      ids = ids[1:]
    return self._tok.decode(ids, skip_special_tokens=False)

  def fingerprint(self) -> dict[str, int]:
    """What identifies this tokenizer's output in a data-iterator state."""
    return {"vocab_size": self.vocab_size, "context_length": self.context_length}

  def __repr__(self) -> str:
    return f"CaptionTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def _from_json(text: str, context_length: int) -> CaptionTokenizer:
  return CaptionTokenizer(tokenizers.Tokenizer.from_str(text), context_length)


def create_tokenizer(name: str, context_length: int) -> CaptionTokenizer:
  """The tokenizer ``clip.tokenizer`` names: ``"builtin"``, a JSON path, or ``"hf:REPO"``."""
  if name == BUILTIN:
    return CaptionTokenizer.builtin(context_length)
  if name.startswith("hf:"):
    return CaptionTokenizer(tokenizers.Tokenizer.from_pretrained(name[3:]), context_length)
  path = os.path.expanduser(name)
  if not os.path.isfile(path):
    raise errors.DataNotFoundError(
      f"clip.tokenizer={name!r} is neither 'builtin', 'hf:REPO' nor an existing JSON file."
    )
  try:
    return CaptionTokenizer.from_file(path, context_length)
  except Exception as e:  # The tokenizers library raises its own types for a bad file.
    raise errors.DataError(f"clip.tokenizer={name!r} is not a tokenizer JSON file: {e}") from e
