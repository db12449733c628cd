"""``jaxcl convert SRC DST``: any model source to an HF directory or a GGUF file.

Conversion needs no torch: weights are read and written with safetensors' numpy API and the gguf
package, and a GGUF file's tokenizer is rebuilt from its metadata without transformers' GGUF
reader (which imports torch).
"""

from __future__ import annotations

import sys
import time


def convert_main(src: str, dst: str, *, dtype: str | None = None) -> int:
    """Load ``src`` (HF directory, ``.gguf`` file or preset) and write ``dst`` (an HF directory,
    or a GGUF file when it ends in ``.gguf``). Returns the process exit status, as ``jaxcl``'s
    others: 0 on success; 2 when the input cannot be used (a bad config field, a tensor of the
    wrong shape or dtype, a missing file: the one message, on stderr, names the file and the field
    or tensor); 1 when the output cannot be written."""
    from jaxcl.models import CheckpointError, from_pretrained, save_pretrained
    from jaxcl.models.config import ConfigError

    start = time.perf_counter()
    try:
        model = from_pretrained(src)
    except (CheckpointError, ConfigError, ValueError, OSError) as err:
        print(f"jaxcl convert: {err}", file=sys.stderr)
        return 2
    try:
        out = save_pretrained(model, dst, dtype=dtype)
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
