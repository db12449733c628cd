"""``jaxcl convert SRC DST``: any model source to an HF directory or a GGUF file."""

from __future__ import annotations

import sys
import time


def convert_main(src: str, dst: str, *, dtype: str | None = None) -> int:
    """Load ``src`` (HF directory, ``.gguf`` file or preset) and write ``dst`` (an HF directory,
    or a GGUF file when it ends in ``.gguf``). Returns the process exit status: 0 on success,
    1 with the error on stderr when the input cannot be read."""
    from jaxcl.models import CheckpointError, from_pretrained, save_pretrained
    from jaxcl.models.config import ConfigError

    start = time.perf_counter()
    try:
        model = from_pretrained(src)
        out = save_pretrained(model, dst, dtype=dtype)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"jaxcl convert: {err}", file=sys.stderr)
        return 1
    cfg = model.config
    print(
        f"{src} -> {out}: {cfg.model_type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_params():,} parameters ({time.perf_counter() - start:.1f}s)"
    )
    return 0
