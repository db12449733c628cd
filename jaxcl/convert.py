"""``jaxcl convert SRC DST``: any model source to an HF directory or a GGUF file.

Conversion needs no torch: weights are read and written with safetensors' numpy API and the gguf
package, and a GGUF file's tokenizer is rebuilt from its metadata without transformers' GGUF
reader (which imports torch).
"""

from __future__ import annotations

import sys
import time


def convert_main(
    src: str,
    dst: str,
    *,
    dtype: str | None = None,
    add_tokens: str | None = None,
    pad_to_multiple_of: int | None = None,
) -> int:
    """Load ``src`` (HF directory, ``.gguf`` file or preset) and write ``dst`` (an HF directory,
    or a GGUF file when it ends in ``.gguf``). Returns the process exit status, as ``jaxcl``'s
    others: 0 on success; 2 when the input cannot be used (a bad config field, a tensor of the
    wrong shape or dtype, a missing file: the one message, on stderr, names the file and the field
    or tensor); 1 when the output cannot be written. ``add_tokens``: a file of new tokens (one a
    line) added to the tokenizer and as new rows (:mod:`jaxcl.models.vocab`), written together
    (an HF directory only)."""
    from jaxcl.models import CheckpointError, from_pretrained, save_pretrained
    from jaxcl.models.config import ConfigError

    start = time.perf_counter()
    tokenizer = None
    try:
        model = from_pretrained(src)
        if add_tokens is not None or pad_to_multiple_of is not None:
            model, tokenizer = _expand_vocab(model, dst, add_tokens, pad_to_multiple_of)
    except (CheckpointError, ConfigError, ValueError, OSError) as err:
        print(f"jaxcl convert: {err}", file=sys.stderr)
        return 2
    try:
        out = save_pretrained(model, dst, dtype=dtype, tokenizer=tokenizer)
    except (CheckpointError, ConfigError, ValueError) as err:  # e.g. a model GGUF cannot hold
        print(f"jaxcl convert: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permissions, a full disk
        print(f"jaxcl convert: cannot write {dst}: {err}", file=sys.stderr)
        return 1
    cfg = model.config
    print(
        f"{src} -> {out}: {cfg.model_type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_params():,} parameters ({time.perf_counter() - start:.1f}s)"
    )
    return 0


def _expand_vocab(model, dst: str, file: str | None, pad_to_multiple_of: int | None):
    """``(grown model, extended tokenizer)`` for ``--add-tokens FILE`` (``ValueError`` naming the
    option, the file and any token the tokenizer already has)."""
    from jaxcl.models.pretrained import load_tokenizer
    from jaxcl.models.vocab import AddTokensSpec, check_new_tokens, expand_vocab_model

    if file is None:
        raise ValueError("--pad-to-multiple-of needs --add-tokens")
    if str(dst).endswith(".gguf"):
        raise ValueError("--add-tokens writes the extended tokenizer: give an HF directory")
    try:
        spec = AddTokensSpec(file=file, pad_to_multiple_of=pad_to_multiple_of)
    except ValueError as err:  # pydantic's: its first message, our field name
        first = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
        raise ValueError(f"--add-tokens: {first.removeprefix('Value error, ')}") from None
    tokens = spec.read()
    tokenizer = load_tokenizer(model)
    check_new_tokens(tokenizer, tokens, f"--add-tokens ({file})")
    grown, ext, _ = expand_vocab_model(
        model, tokenizer, tokens, pad_to_multiple_of=pad_to_multiple_of
    )
    return grown, ext
