"""BERT-uncased WordPiece tokenizer for FLIP's text encoder.

Choices, following the FLIP paper and the official code (facebookresearch/flip,
``configs/default.py``: ``aug.txt.tokenizer="tf_bert"``, ``max_len=32``,
``cls_token=False``):

* Vocabulary: Google's bert-base-uncased WordPiece vocabulary (30522 entries,
  shipped in ``flip/assets``; see its README for provenance). Text is
  lower-cased and accents are stripped, as in BERT-uncased.
* No ``[CLS]``/``[SEP]`` are added. The official text encoder pools the
  output at position 0 (``x_txt[:, 0]``), which is simply the first word
  piece of the caption; special tokens were never inserted.
* Every caption is truncated / right-padded with ``[PAD]`` (id 0) to exactly
  ``context_length`` tokens (32 by default). The padding mask is ``ids != 0``.
* Words that are not in the vocabulary become ``[UNK]`` (id 100).
  (The official JAX model sizes its embedding table 30523 because
  TF-Text's lookup table adds one OOV bucket; that id is never emitted.)

Encoding uses the Rust ``tokenizers`` library (``encode_batch``). A pickled
``Tokenizer`` carries only its settings and the vocabulary path and is rebuilt
on unpickling, so it is cheap to send to DataLoader worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

__all__ = ["VOCAB_PATH", "VOCAB_SIZE", "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID", "Tokenizer"]

VOCAB_PATH: Path = Path(__file__).resolve().parent / "assets" / "bert-base-uncased-vocab.txt"
VOCAB_SIZE = 30522
PAD_ID = 0
UNK_ID = 100
BOS_ID = 101  # [CLS]: starts every caption decoder sequence
EOS_ID = 102  # [SEP]: ends it
SPECIAL = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[CLS]": BOS_ID, "[SEP]": EOS_ID}


class Tokenizer:
    """Map captions to a ``(B, context_length)`` ``torch.long`` tensor of WordPiece ids."""

    def __init__(self, context_length: int = 32, vocab_path: str | os.PathLike = VOCAB_PATH):
        if (
            isinstance(context_length, bool)
            or not isinstance(context_length, int)
            or context_length < 1
        ):
            raise ValueError(f"context_length must be an integer >= 1, got {context_length!r}")
        vocab_path = Path(vocab_path)
        if not vocab_path.is_file():
            raise FileNotFoundError(f"WordPiece vocabulary file not found: {vocab_path}")
        self.context_length = context_length
        self.vocab_path = vocab_path
        # Built from parts rather than BertWordPieceTokenizer so that no special tokens are
        # registered: a caption containing the literal text "[SEP]" or "[PAD]" is split into
        # ordinary word pieces (as TF-Text does) instead of becoming id 102 / 0.
        self._tok = _HFTokenizer(models.WordPiece.from_file(str(vocab_path), unk_token="[UNK]"))
        self._tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tok.decoder = decoders.WordPiece(prefix="##")
        if any(self._tok.token_to_id(t) != i for t, i in SPECIAL.items()):
            raise ValueError(
                f"{vocab_path}: expected "
                + ", ".join(f"{t!r} at id {i}" for t, i in SPECIAL.items())
            )
        self._tok.enable_truncation(max_length=context_length)
        self._tok.enable_padding(length=context_length, pad_id=PAD_ID, pad_token="[PAD]")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
            raise ValueError(f"expected a str or a sequence of str, got {type(texts).__name__}")
        else:
            texts = list(texts)
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise ValueError(f"all captions must be str, element {i} is {type(t).__name__}")
        if not texts:
            return torch.zeros((0, self.context_length), dtype=torch.long)
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def to_json(self) -> str:
        """This tokenizer as a ``tokenizers`` JSON document (a ``tokenizer.json``, which
        ``transformers.AutoTokenizer`` loads) without padding and truncation: a loader sets
        those per call. The OpenCLIP export ships it (``flip.interop.openclip``)."""
        tok = _HFTokenizer.from_str(self._tok.to_str())
        tok.no_padding()
        tok.no_truncation()
        return tok.to_str()

    def decode(self, ids) -> str:
        """Decode one sequence of ids (list or 1-D tensor) back to text, dropping padding."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(
                    f"decode expects a single 1-D sequence of ids, got shape {tuple(ids.shape)}"
                )
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids if int(i) != PAD_ID])

    def __getstate__(self) -> dict:
        return {"context_length": self.context_length, "vocab_path": str(self.vocab_path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(context_length={self.context_length}, vocab_path='{self.vocab_path}')"
