"""A character-level tokenizer with the surface ``HookedLoopedTransformer`` (and TransformerLens's
token helpers) call on a Hugging Face tokenizer, without depending on ``transformers``.

One character is one token; the special tokens ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>`` are
written as such in text (``model.to_tokens`` prepends ``bos_token`` as a string). Saved as
``char_tokenizer.json`` next to the weights; ``tl_loop.loading`` picks it up when it loads the
folder.

>>> tok = CharTokenizer("ab=;?0123456789")
>>> ids = tok.encode("<bos>a=7;a?")
>>> tok.decode(ids)
'<bos>a=7;a?'
>>> tok(["a?", "a=1;"], padding=True, return_tensors="pt")["input_ids"].tolist()
[[4, 8, 0, 0], [4, 6, 10, 7]]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

#: File name of a saved ``CharTokenizer`` (read by ``tl_loop.loading.files.load_tokenizer``).
TOKENIZER_FILE = "char_tokenizer.json"

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


class BatchEncoding(dict):
    """``{"input_ids": ..., "attention_mask": ...}`` with attribute access, like transformers'."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CharTokenizer:
    """Character-level tokenizer: ids 0..3 are ``<pad> <bos> <eos> <unk>``, then one id per
    character of ``chars`` in order.

    Implements the subset of the ``transformers`` tokenizer API that ``model.to_tokens``,
    ``to_string``, ``to_str_tokens`` and ``to_single_token`` use: ``__call__`` (padding,
    truncation, ``return_tensors="pt"``), ``encode``, ``decode``, ``batch_decode``,
    ``convert_ids_to_tokens``, ``convert_tokens_to_ids``, the ``*_token`` / ``*_token_id``
    attributes, ``padding_side``, ``save_pretrained`` / ``from_pretrained``.
    """

    def __init__(self, chars: str, padding_side: str = "right", words: Sequence[str] = ()) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: chars must be distinct")
        words = tuple(words)
        if len(set(words)) != len(words) or any(len(w) < 2 or w in SPECIAL_TOKENS for w in words):
            raise ValueError("CharTokenizer: words must be distinct, of 2 characters or more, not special tokens")
        self.chars = chars
        self.words = words  # multi-character tokens, after the characters; matched before them
        self.vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        for c in chars:
            self.vocab[c] = len(self.vocab)
        for w in words:
            self.vocab[w] = len(self.vocab)
        self._word_lengths = sorted({len(w) for w in words}, reverse=True)
        self.ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self.bos_token: str | None = "<bos>"
        self.eos_token: str | None = "<eos>"
        self.pad_token: str | None = "<pad>"
        self.unk_token: str | None = "<unk>"
        self.padding_side = padding_side
        self.model_max_length = 10**9
        self.name_or_path = "char-tokenizer"
        # dense lookup for fast encoding of plain text
        self._lookup = {c: i for c, i in self.vocab.items() if len(c) == 1}

    # ---- vocabulary ----
    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.vocab[token]

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id(self.unk_token)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.vocab.get(tokens, self.vocab["<unk>"])
        return [self.vocab.get(t, self.vocab["<unk>"]) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.ids_to_tokens[ids]
        return [self.ids_to_tokens[int(i)] for i in ids]

    # ---- encoding ----
    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into tokens: special-token strings first, then the longest matching
        word, then single characters."""
        out: list[str] = []
        i = 0
        while i < len(text):
            if text[i] == "<":
                special = next((s for s in SPECIAL_TOKENS if text.startswith(s, i)), None)
                if special is not None:
                    out.append(special)
                    i += len(special)
                    continue
            word = next((text[i:i + n] for n in self._word_lengths if text[i:i + n] in self.vocab), None)
            if word is not None:
                out.append(word)
                i += len(word)
                continue
            out.append(text[i])
            i += 1
        return out

    def encode(self, text: str, add_special_tokens: bool = False, **_: Any) -> list[int]:
        """Token ids of ``text`` (``add_special_tokens=True`` prepends ``<bos>``); characters
        outside the vocabulary become ``<unk>``."""
        unk = self.vocab["<unk>"]
        if "<" in text or self.words:
            ids = [self.vocab.get(t, unk) for t in self.tokenize(text)]
        else:
            ids = [self._lookup.get(c, unk) for c in text]
        if add_special_tokens and self.bos_token is not None:
            ids = [self.vocab[self.bos_token], *ids]
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        return_tensors: str | None = None,
        padding: bool | str = False,
        add_special_tokens: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        **_: Any,
    ) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation and max_length is not None:
            ids = [x[:max_length] for x in ids]
        mask = [[1] * len(x) for x in ids]
        lengths = {len(x) for x in ids}
        if padding in (True, "longest", "max_length") and len(lengths) > 1 or padding == "max_length":
            if self.pad_token is None:
                raise ValueError("CharTokenizer: padding needs a pad_token")
            width = max_length if padding == "max_length" and max_length is not None else max(lengths)
            pad = self.vocab[self.pad_token]
            for x, m in zip(ids, mask):
                fill = width - len(x)
                if self.padding_side == "left":
                    x[:0], m[:0] = [pad] * fill, [0] * fill
                else:
                    x.extend([pad] * fill)
                    m.extend([0] * fill)
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("CharTokenizer: texts of different lengths need padding=True for tensors")
            return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long),
                                 attention_mask=torch.tensor(mask, dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"CharTokenizer: return_tensors must be 'pt' or None, got {return_tensors!r}")
        if single:
            return BatchEncoding(input_ids=ids[0], attention_mask=mask[0])
        return BatchEncoding(input_ids=ids, attention_mask=mask)

    # ---- decoding ----
    def decode(self, ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        elif isinstance(ids, int):
            ids = [ids]
        tokens = [self.ids_to_tokens[int(i)] for i in ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in SPECIAL_TOKENS]
        return "".join(tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ---- files ----
    def to_dict(self) -> dict[str, Any]:
        data = {"type": "CharTokenizer", "chars": self.chars, "special_tokens": list(SPECIAL_TOKENS),
                "padding_side": self.padding_side}
        if self.words:
            data["words"] = list(self.words)
        return data

    def save_pretrained(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CharTokenizer":
        path = Path(folder)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        data = json.loads(path.read_text())
        if data.get("type") != "CharTokenizer" or tuple(data.get("special_tokens", ())) != SPECIAL_TOKENS:
            raise ValueError(f"{path} is not a CharTokenizer file")
        return cls(data["chars"], padding_side=data.get("padding_side", "right"), words=data.get("words", ()))

    def __repr__(self) -> str:
        words = f", words={len(self.words)}" if self.words else ""
        return f"CharTokenizer(vocab_size={self.vocab_size}, chars={self.chars!r}{words})"
