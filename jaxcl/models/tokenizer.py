"""The byte-level tokenizer of the tiny presets.

Token ids: ``0`` pad, ``1`` bos, ``2`` eos, then byte ``b`` → ``b + 3`` (259 ids in all). UTF-8
text of any language round-trips exactly.
"""

from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        data = bytearray()
        for i in ids:
            i = int(i)
            if i >= self.offset:
                data.append(i - self.offset)
            elif not skip_special_tokens:
                data.extend(f"<{['pad', 'bos', 'eos'][i]}>".encode())
        return data.decode("utf-8", errors="replace")
