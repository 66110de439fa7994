"""Tokenising text rows with bounded memory: each text is cut to a character budget before the tokenizer
sees it, rows are tokenised in chunks (with a progress bar on large data), and the token ids are kept in
one flat int32 array (:class:`TokenRows`) rather than as Python lists of ints.

The cut is exact: a text is cut at a space at most ``CHARS_PER_TOKEN`` characters per token of
``max_length`` into it; a cut row whose tokens do not fill ``max_length`` is tokenised again with an
8 times longer piece (up to the whole text), so a row's token ids are the ones the whole text would give.
Memory for tokenising is thus bounded by the budget, not by the longest text in the file.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np
import torch

CHARS_PER_TOKEN = 64  # a token of ordinary text is 3-6 characters; 64 leaves room for long words and spaces
MIN_CHARS = 2048
CHUNK_ROWS = 2048  # rows tokenised at once: the tokenizer's output for 2048 rows of 128 tokens is ~50 MB
PROGRESS_ROWS = 50_000  # a progress bar from this many rows on


def char_budget(max_length: int) -> int:
    """How many characters of a text are tokenised first for ``max_length`` tokens."""
    return max(MIN_CHARS, CHARS_PER_TOKEN * int(max_length))


def cut(text: str, chars: int) -> str:
    """``text`` up to about ``chars`` characters, cut before a space when there is one in its last quarter
    (so the piece's last word is whole, and a tokenizer that joins a space to the word after it, as BPE
    and SentencePiece do, gives the piece the same tokens as the whole text)."""
    if len(text) <= chars:
        return text
    space = text.rfind(" ", chars * 3 // 4, chars)
    return text[: space if space > 0 else chars]


class TokenRows(torch.utils.data.Dataset):
    """Tokenised rows kept compact: the ids of all rows in one int32 array with row offsets, token type ids
    (when the tokenizer gives them) as int8; the attention mask is all ones (rows are unpadded)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, types: Optional[np.ndarray] = None, labels=None,
                 index=None):
        self.ids, self.offsets, self.types = ids, offsets, types
        self.labels = labels
        self.index = index

    def __len__(self):
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def __getitem__(self, i):
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        item = {"input_ids": self.ids[a:b].tolist(), "attention_mask": [1] * (b - a)}
        if self.types is not None:
            item["token_type_ids"] = self.types[a:b].tolist()
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def _encode_rows(tokenizer, texts: list, pairs: Optional[list], max_length: int) -> list:
    """(input_ids, token_type_ids or None) per row, each text cut by the exact rule of the module doc."""
    chars = char_budget(max_length)
    done: list = [None] * len(texts)
    todo = list(range(len(texts)))
    while todo:
        a = [cut(texts[i], chars) for i in todo]
        b = [cut(pairs[i], chars) for i in todo] if pairs is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        types = enc.get("token_type_ids")
        again = []
        for j, i in enumerate(todo):
            ids = enc["input_ids"][j]
            was_cut = len(a[j]) < len(texts[i]) or (b is not None and len(b[j]) < len(pairs[i]))
            if was_cut and len(ids) < max_length:
                again.append(i)  # the piece gave too few tokens: take a longer one
            else:
                done[i] = (ids, types[j] if types is not None else None)
        todo = again
        chars *= 8
    return done


def encode_texts(tokenizer, texts: Sequence[str], pairs: Optional[Sequence[str]], max_length: int, labels=None,
                 index=None, progress: bool = True, desc: str = "tokenizing") -> TokenRows:
    """Tokenise ``texts`` (and ``pairs``) truncated to ``max_length`` tokens into a :class:`TokenRows`."""
    from tqdm.auto import tqdm

    n = len(texts)
    id_parts, type_parts, lengths = [], [], []
    has_types = None
    with tqdm(total=n, desc=desc, unit="rows", disable=not progress or n < PROGRESS_ROWS, leave=False) as bar:
        for start in range(0, n, CHUNK_ROWS):
            stop = min(n, start + CHUNK_ROWS)
            rows = _encode_rows(tokenizer, [str(t) for t in texts[start:stop]],
                                [str(p) for p in pairs[start:stop]] if pairs is not None else None, max_length)
            if has_types is None:
                has_types = bool(rows) and rows[0][1] is not None
            count = sum(len(r[0]) for r in rows)
            id_parts.append(np.fromiter(itertools.chain.from_iterable(r[0] for r in rows), np.int32, count))
            if has_types:
                type_parts.append(np.fromiter(itertools.chain.from_iterable(r[1] for r in rows), np.int8, count))
            lengths.extend(len(r[0]) for r in rows)
            bar.update(stop - start)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int32)
    types = (np.concatenate(type_parts) if type_parts else np.zeros(0, np.int8)) if has_types else None
    return TokenRows(ids, offsets, types, labels, index)


def tokenize_capped(tokenizer, text: str, max_tokens: int, **kwargs) -> list:
    """The token ids of ``text`` (the first ``max_tokens`` at least, when it has that many), tokenising only a
    piece of a long text (the same exact rule as :func:`encode_texts`)."""
    chars = char_budget(max_tokens)
    while True:
        piece = cut(text, chars)
        ids = tokenizer(piece, **kwargs)["input_ids"]
        if len(piece) == len(text) or len(ids) > max_tokens:
            return ids
        chars *= 8
