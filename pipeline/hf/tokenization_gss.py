"""`GSSTokenizer`: the pipeline's SentencePiece model, encoding and decoding exactly as `pipeline.tokenizer` does.

Ids are SentencePiece's own (no added-token splitting or normalisation on top); `</s>` is the end-of-document
id. A document starts after `</s>`, as in the training stream and `gss generate`'s prompt, so special tokens
(the default) put `</s>` in front; the pipeline's encoding of a document is `encode(text,
add_special_tokens=False) + [eos_token_id]`. Decoding drops `</s>`, which is never text.
"""

from __future__ import annotations

import os

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class GSSTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, eos_token: str = "</s>", bos_token: str = "</s>", unk_token: str = "<unk>",
                 **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)  # before super(): it asks for the vocabulary
        kwargs.setdefault("special_tokens_pattern", "bos")
        super().__init__(eos_token=eos_token, bos_token=bos_token, unk_token=unk_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)  # the whole text to SentencePiece, as the pipeline gives it

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode(self.convert_tokens_to_ids(tokens))

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        return self.sp.decode([int(i) for i in ids if int(i) != self.eos_token_id])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        with open(path, "wb") as f:
            f.write(self.sp.serialized_model_proto())
        return (path,)
