"""Each token's share of a text, for showing tokens with their true boundaries.

Byte-level BPE tokenizers (GPT-2's scheme, used by SmolLM2, Llama 3 and most recent models) split
a character that takes several UTF-8 bytes, like an emoji or a CJK ideograph, over several
tokens. Decoding each token alone then gives U+FFFD for each part, and the typed text is lost.
Decoding the token bytes in order, with an incremental UTF-8 decoder, gives every character to
the token that completes it: joined, the pieces are the text again.
"""

from __future__ import annotations

import codecs
from typing import NamedTuple


class TokenPiece(NamedTuple):
    text: str  # the characters this token completes ("" when it completes none)
    carries: bool  # it also holds the first bytes of a character that a later token completes


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's reversible map of the 256 bytes to printable characters, inverted: the character
    a byte-level token string uses for each byte -> that byte. Printable Latin-1 bytes stand for
    themselves; the others (controls, space, ...) are shifted to U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [byte for byte in range(256) if byte not in printable]
    alphabet = {chr(byte): byte for byte in printable}
    alphabet.update({chr(256 + i): byte for i, byte in enumerate(shifted)})
    return alphabet


BYTE_OF = _byte_alphabet()


def token_bytes(token: str) -> bytes | None:
    """The bytes of a byte-level BPE token string ('ĠðŁĺ' -> b' \\xf0\\x9f\\x98'), None when the
    string is not one (another tokenizer's scheme)."""
    try:
        return bytes(BYTE_OF[char] for char in token)
    except KeyError:
        return None


def token_pieces(tokenizer, ids: list[int]) -> list[TokenPiece]:
    """Each token's piece of the text that `ids` decode to. Byte-level tokenizers are decoded
    byte by byte as above; any other tokenizer one token at a time, as it decodes them."""
    ids = [int(i) for i in ids]
    raw = [token_bytes(token) for token in tokenizer.convert_ids_to_tokens(ids)]
    if any(b is None for b in raw):
        return [TokenPiece(tokenizer.decode([i]), False) for i in ids]
    return pieces_of_bytes(raw)


def pieces_of_bytes(raw: list[bytes]) -> list[TokenPiece]:
    """Each token's piece of the UTF-8 text its bytes spell, decoded in order."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    for i, data in enumerate(raw):
        final = i == len(raw) - 1  # bytes left at the end are not a character: U+FFFD
        text = decoder.decode(data, final=final)
        pieces.append(TokenPiece(text, bool(decoder.getstate()[0])))
    return pieces


class VocabBytes:
    """A vocabulary's token bytes (harvest/token_bytes.json: hex per id), to cut a sequence of
    token ids into the pieces of its text without the tokenizer."""

    def __init__(self, token_bytes: list[str] | None):
        self.raw = [bytes.fromhex(h) for h in token_bytes] if token_bytes is not None else []
        self.partial = {i for i, b in enumerate(self.raw) if not whole_utf8(b)}  # parts of characters

    def pieces(self, ids: list[int]) -> list[TokenPiece] | None:
        """Each token's piece of the text, or None when no token of `ids` holds part of a character
        (then each token's own string is its piece)."""
        if self.partial.isdisjoint(ids):
            return None
        return pieces_of_bytes([self.raw[t] for t in ids])


def whole_utf8(data: bytes) -> bool:
    """Whether a token's bytes are whole characters (they decode alone as they do in any text)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def vocab_bytes(tokenizer, size: int) -> list[str] | None:
    """Every token id's bytes as hex (harvest's token_bytes.json), so that text made of token ids
    can be cut into pieces later without the tokenizer; None for a tokenizer that is not
    byte-level BPE (its tokens decode one at a time)."""
    raw = [token_bytes(token or "") for token in tokenizer.convert_ids_to_tokens(list(range(size)))]
    return None if any(b is None for b in raw) else [b.hex() for b in raw]
