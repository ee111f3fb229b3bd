"""The artifact's tokenizer (tokenizer.json through the `tokenizers` library) and streaming decode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fmoe.errors import FmoeError

REPLACEMENT = "\ufffd"


class Tokenizer:
    """encode/decode with the packed directory's tokenizer.json (no BOS is added: Qwen has none)."""

    def __init__(self, path: Path | str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FmoeError(f"{path}: missing (re-run `fmoe extract`, which copies the tokenizer)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise FmoeError(f"{path}: not a valid tokenizer.json ({exc})") from None
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int | None:
        """Id of a token by its text (``<|im_end|>``), or None when the vocabulary lacks it."""
        return self._tok.token_to_id(name)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces.

    A multi-byte UTF-8 character may be split over several byte-level tokens; until its last byte
    arrives the partial text ends in U+FFFD, so the new text is held back. Decoding from a short
    window of previous tokens (not just the new one) keeps the spacing and merges the tokenizer's
    decoder applies across token boundaries.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly empty)."""
        self._ids.append(int(token_id))
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            piece = text[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(before) :]
