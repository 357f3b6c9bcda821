"""SentencePiece: train on a sample of the training split, load, encode with an end-of-document token.

Byte fallback means no text maps to <unk>; the identity normalisation, kept runs of spaces and
newline/tab pieces mean `decode(encode(text)) == text` for prose, LaTeX and code alike.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm

if TYPE_CHECKING:  # this file travels alone with the registered model (pipeline/registered_model.py)
    from pipeline.config import TokenizerConfig

# SentencePiece's own ids: <unk>=0, <s>=1, </s>=2; </s> ends every document.
EOD_PIECE = "</s>"
MAX_SENTENCE_BYTES = 16384  # training pieces are cut at line boundaries to at most this


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> bytes:
    """Train a model on `texts` (documents or pieces of them) and return its serialized bytes."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_pieces(texts),
        model_writer=model,
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n", "\t"],
        max_sentence_length=MAX_SENTENCE_BYTES,
        hard_vocab_limit=False,  # a small sample may support fewer pieces than asked; the model says how many
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


def training_pieces(texts: Iterable[str]) -> Iterator[str]:
    """Documents cut into pieces of whole lines (newlines kept) that fit max_sentence_length."""
    for text in texts:
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode())
            if piece and size + n > MAX_SENTENCE_BYTES:
                yield "".join(piece)
                piece, size = [], 0
            if n <= MAX_SENTENCE_BYTES:
                piece.append(line)
                size += n
        if piece:
            yield "".join(piece)


def tokenizer_hash(model_bytes: bytes) -> str:
    return hashlib.sha256(model_bytes).hexdigest()


class Tokenizer:
    """A loaded SentencePiece model; `encode_documents` appends the end-of-document id."""

    def __init__(self, model_bytes: bytes):
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self.sp.piece_to_id(EOD_PIECE)

    def encode_document(self, text: str) -> np.ndarray:
        return self.encode_documents([text])[0]

    def encode_documents(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """int32 ids of each text followed by the end-of-document id; C++ threads share the batch.

        SentencePiece hands back int32 buffers directly (`return_type="numpy"`): no Python list per token.
        """
        eod = np.array([self.eod_id], dtype=np.int32)
        ids = self.sp.encode(texts, return_type="numpy", num_threads=num_threads)
        return [np.concatenate([a, eod]) for a in ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if i != self.eod_id])
