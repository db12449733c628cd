"""EleutherAI's lm-evaluation-harness over jaxcl models: ``--model jaxcl``.

:class:`JaxclLM` is an ``lm_eval.api.model.LM`` (through lm-eval's ``TemplateLM``, so contexts
and continuations are tokenized exactly as lm-eval's ``hf`` backend tokenizes them) over a jaxcl
decoder, registered under the name ``jaxcl``:

* ``loglikelihood``: ``(context, continuation)`` pairs encoded as the ``hf`` backend does
  (context + continuation encoded whole, the context's tokens split off; an empty context is
  the prefix token), cut from the left to ``max_length + 1`` tokens; requests sorted by length,
  right-padded to a few bucketed lengths (powers of two from 16, and ``max_length``) in batches
  of a fixed size, so one jitted forward pass is compiled per bucket. Returns, per request, the
  summed log-probability of the continuation and whether greedy decoding reproduces it.
* ``loglikelihood_rolling``: the disjoint rolling windows of
  ``lm_eval.utils.get_rolling_token_windows`` / ``make_disjoint_window`` (window
  ``max_length``, the prefix token first), scored as above and summed per document.
* ``generate_until``: :func:`jaxcl.generate` (the jitted loop with the key/value cache), greedy
  unless the request samples, ``max_gen_toks`` new tokens (default 256) after the context cut
  from the left to ``max_length − max_gen_toks`` tokens; it stops early at the eos token and at
  a stop string that is a single token; the text is cut at the first ``until`` string.

Model arguments (``--model_args`` or keyword arguments): exactly one source of ``preset=NAME``
(a jaxcl preset: random weights from ``seed``, or a weights preset such as
``smollm2-135m-instruct``), ``hf=PATH`` (an HF directory or a ``.gguf`` file;
``tokenizer=bytes|PATH`` when the directory holds no tokenizer) or ``checkpoint=STEP_DIR``
with ``recipe=RECIPE.yaml`` (a jaxcl run's checkpoint, read as ``jaxcl eval`` reads it, on the
recipe's mesh); in Python also ``model=`` (a :class:`~jaxcl.models.Decoder`) or ``params=`` with
``config=`` (a :class:`~jaxcl.models.ModelConfig`) and ``tokenizer=``. Then ``batch_size``
(default 8), ``max_length`` (default: the model's ``max_position_embeddings``),
``max_gen_toks``, ``dtype`` (compute dtype), ``add_bos_token``, ``prefix_token_id``.

lm-eval 0.4 finds models only in its own registry (it has no plugin entry points): jaxcl's
install puts a start-up hook in site-packages (:mod:`jaxcl._lm_eval_hook`) that registers
``jaxcl`` there lazily, so lm-eval's own ``lm_eval --model jaxcl ...`` works;
``python -m jaxcl.eval.harness ARGS`` (or the ``jaxcl-lm-eval`` script) is the same command
line with the model registered by this module's import, for installs without the hook.
:func:`~jaxcl.eval.harness_run.run_lm_eval` is the function the trainer and ``jaxcl eval``
call. Model arguments and loading: :mod:`jaxcl.eval.harness_load`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

try:
    import lm_eval
    import lm_eval.models  # noqa: F401  lm-eval's own model table (read only while the registry is empty)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
except ImportError as _err:  # the optional extra is not installed
    raise ImportError(
        'jaxcl.eval.harness needs lm-eval: pip install -e ".[lm-eval]" (or pip install '
        f"'lm-eval>=0.4,<0.5'); importing it failed: {_err}"
    ) from None

from jaxcl import parallel
from jaxcl.eval.harness_load import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_GEN_TOKS,
    DTYPES,
    IGNORED_ARGS,
    MODEL_ARGS,
    SOURCES,
    HarnessTokenizer,
    ModelArgsError,
    int_arg,
    load_model,
    optional_bool,
)
from jaxcl.models.config import ModelConfig
from jaxcl.objectives import token_logps

log = logging.getLogger(__name__)

MIN_BUCKET = 16
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p")


# ----------------------------------------------------------------------------- jitted scoring


@partial(jax.jit, static_argnums=0)
def _target_logprobs(graphdef: nnx.GraphDef, state: Any, inputs: jax.Array, targets: jax.Array):
    """``(log p(targets) [B, L], argmax == targets [B, L])`` from one forward pass."""
    logits = nnx.merge(graphdef, state)(inputs)
    return token_logps(logits, targets), jnp.argmax(logits, axis=-1) == targets


def length_buckets(max_length: int) -> list[int]:
    """The padded lengths a batch may take: powers of two from 16 below ``max_length``, then
    ``max_length`` itself."""
    buckets, n = [], MIN_BUCKET
    while n < max_length:
        buckets.append(n)
        n *= 2
    return [*buckets, max_length]


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


# ----------------------------------------------------------------------------- the model


class JaxclLM(TemplateLM):
    """lm-eval's model interface over a jaxcl decoder (see the module docstring)."""

    def __init__(
        self,
        model: Any = None,
        *,
        params: Any = None,
        config: ModelConfig | None = None,
        tokenizer: Any = None,
        preset: str | None = None,
        hf: str | None = None,
        checkpoint: str | None = None,
        recipe: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        dtype: str | None = None,
        seed: int = 0,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        mesh: Any = None,
        rules: Any = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        ignored = {k: v for k, v in unknown.items() if k in IGNORED_ARGS}
        unknown = {k: v for k, v in unknown.items() if k not in IGNORED_ARGS}
        if unknown:
            raise ModelArgsError(
                f"unknown jaxcl model_args {', '.join(sorted(unknown))}; valid: "
                f"{', '.join(MODEL_ARGS)}"
            )
        if ignored.get("device") is not None:
            log.info(
                "jaxcl backend: device=%s is not used (JAX places the model)", ignored["device"]
            )
        given = {
            name: value
            for name, value in zip(SOURCES, (preset, hf, checkpoint, model, params))
            if value is not None
        }
        if len(given) != 1:
            raise ModelArgsError(
                "jaxcl model_args need exactly one model source of preset=NAME, hf=PATH or "
                "checkpoint=STEP_DIR (with recipe=RECIPE.yaml); "
                + (f"got {', '.join(given)}" if given else "got none")
            )
        if dtype is not None and dtype not in DTYPES:
            raise ModelArgsError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
        if recipe is not None and checkpoint is None:
            raise ModelArgsError("recipe= goes with checkpoint=STEP_DIR (the checkpoint it made)")
        if config is not None and params is None:
            raise ModelArgsError("config= goes with params= (the parameters it describes)")
        if isinstance(model, str | Path) or isinstance(params, str | Path):
            raise ModelArgsError(
                "model= and params= take objects (a jaxcl Decoder, a parameter tree) in Python; "
                "name a model on the command line with preset=, hf= or checkpoint="
            )
        seed = int_arg("seed", seed, minimum=0)
        self.batch_size_per_device = int_arg(
            "batch_size", DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        )
        self._max_gen_toks = int_arg("max_gen_toks", max_gen_toks)

        source = next(iter(given))
        model, tokenizer, mesh, rules = load_model(
            source, given[source], config, tokenizer, recipe, dtype, seed, mesh, rules
        )
        cfg: ModelConfig = model.config
        self.config = cfg
        self._tok = HarnessTokenizer(tokenizer, optional_bool("add_bos_token", add_bos_token))
        self.tokenizer = tokenizer  # lm-eval reads it (chat templates)
        self.custom_prefix_token_id = (
            None if prefix_token_id is None else int_arg("prefix_token_id", prefix_token_id, 0)
        )
        limit = cfg.max_position_embeddings
        self._max_length = limit if max_length is None else int_arg("max_length", max_length, 2)
        if self._max_length > limit:
            raise ModelArgsError(
                f"max_length={self._max_length} exceeds the model's max_position_embeddings "
                f"({limit})"
            )
        self.mesh, self.rules = mesh, rules
        self._place(model)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> JaxclLM:
        """From ``--model_args`` (a dict) and lm-eval's own ``batch_size``/``device``/...:
        a value in the model arguments wins (lm-eval passes ``batch_size=1`` when the command
        line gives no ``--batch_size``)."""
        extra = {
            k: v
            for k, v in (additional_config or {}).items()
            if v is not None and k not in arg_dict
        }
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> JaxclLM:
        """From ``--model_args key=value,key=value`` (see :meth:`create_from_arg_obj`)."""
        return cls.create_from_arg_obj(
            lm_utils.simple_parse_args_string(arg_string), additional_config
        )

    def _place(self, model: Any) -> None:
        """Split the model once; on a mesh, shard its parameters by the logical rules."""
        graphdef, state = nnx.split(model)
        if self.mesh is not None:
            self.rules = self.rules or parallel.DEFAULT_RULES
            names = parallel.param_logical_names(model, nnx.Variable)
            pure = nnx.to_pure_dict(state)
            shardings = parallel.tree_shardings(names, pure, self.mesh, self.rules)
            nnx.replace_by_pure_dict(state, jax.device_put(pure, shardings))
            self._batch_sharding = parallel.batch_sharding(self.mesh, self.rules)
            axes = self._batch_sharding.spec[0] if self._batch_sharding.spec else None
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            rows = math.prod(self.mesh.shape[a] for a in axes)  # a batch splits evenly
            self.batch_size_per_device = -(-self.batch_size_per_device // rows) * rows
        else:
            self._batch_sharding = None
        self.graphdef, self.state = graphdef, state

    # -- what lm-eval reads ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._tok.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self._tok.bos_token_id
        return int(bos) if bos is not None else self._tok.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def tokenizer_name(self) -> str:
        name = getattr(self.tokenizer, "name_or_path", None) or type(self.tokenizer).__name__
        return str(name).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        prefix_text = self._tok.decode(self.prefix_token_id, skip_special_tokens=False)
        return self._tok.encode(string, add_special_tokens, prefix_text)

    def tok_decode(self, tokens: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self._tok.is_bytes or not hasattr(self.tokenizer, "apply_chat_template"):
            raise ValueError(
                "--apply_chat_template: the model's tokenizer has no chat template (jaxcl's byte "
                "tokenizer)"
            )
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if self._tok.is_bytes:
            return None
        return super().chat_template(chat_template)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": self.config.num_params(), "model_dtype": self.config.dtype}

    # -- scoring ------------------------------------------------------------------------------

    def _score_rows(
        self, rows: list[tuple[list[int], int]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(Σ log p, greedy)`` of the last ``n`` tokens of each ``tokens`` in ``rows`` (pairs
        ``(tokens, n)``, each at most ``max_length + 1`` tokens), batched by length bucket."""
        buckets = length_buckets(self.max_length)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        by_bucket: dict[int, list[int]] = {}
        for i in order:
            by_bucket.setdefault(_bucket(len(rows[i][0]) - 1, buckets), []).append(i)
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        size = self.batch_size
        bar = tqdm(total=len(rows), desc="jaxcl loglikelihood", disable=disable_tqdm)
        for width, members in sorted(by_bucket.items(), reverse=True):
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                inputs = np.zeros((size, width), np.int32)
                targets = np.zeros((size, width), np.int32)
                for r, i in enumerate(chunk):
                    tokens = rows[i][0]
                    inputs[r, : len(tokens) - 1] = tokens[:-1]
                    targets[r, : len(tokens) - 1] = tokens[1:]
                logp, greedy = self._forward(inputs, targets)
                for r, i in enumerate(chunk):
                    tokens, n = rows[i]
                    end = len(tokens) - 1
                    span = slice(end - n, end)
                    out[i] = (
                        float(logp[r, span].astype(np.float64).sum()),
                        bool(greedy[r, span].all()),
                    )
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _forward(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._batch_sharding is not None:
            placed = parallel.put_global({"i": inputs, "t": targets}, self._batch_sharding)
            inputs_, targets_ = placed["i"], placed["t"]
        else:
            inputs_, targets_ = jnp.asarray(inputs), jnp.asarray(targets)
        logp, greedy = _target_logprobs(self.graphdef, self.state, inputs_, targets_)
        return parallel.to_host(logp), parallel.to_host(greedy)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("a loglikelihood request needs context and continuation tokens")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens exceeds max_length "
                    f"({self.max_length})"
                )
            tokens = (context + continuation)[-(self.max_length + 1) :]
            rows.append((tokens, len(continuation)))
        results = self._score_rows(rows, disable_tqdm)
        for (request, _, _), answer in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, scores):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from jaxcl.models.generate import generate

        model = nnx.merge(self.graphdef, self.state)
        groups: dict[str, list[int]] = {}
        args = [req.args for req in requests]
        for i, (_, gen_kwargs) in enumerate(args):
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="jaxcl generate_until", disable=disable_tqdm)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(args[members[0]][1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            sampling = {k: kwargs.pop(k) for k in SAMPLING_KWARGS if k in kwargs}
            if kwargs:
                log.warning("jaxcl backend: generation kwargs %s are not used", sorted(kwargs))
            temperature = float(sampling.get("temperature") or 0.0)
            if not sampling.get("do_sample"):
                temperature = 0.0
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(
                    f"max_gen_toks ({max_new}) must be less than max_length ({self.max_length})"
                )
            stops = {self.eot_token_id, *self.config.stop_token_ids}
            stops |= {t for s in until if (t := self._tok.single_token(s)) is not None}
            encoded = {i: self.tok_encode(args[i][0])[-room:] for i in members}
            order = sorted(members, key=lambda i: (-len(encoded[i]), args[i][0]))
            size = self.batch_size
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                prompts = [encoded[i] for i in chunk]
                prompts += [prompts[0]] * (size - len(prompts))  # a fixed batch shape
                tokens = np.asarray(
                    generate(
                        model,
                        prompts,
                        max_new_tokens=max_new,
                        temperature=temperature,
                        top_k=int(sampling.get("top_k") or 0),
                        top_p=float(sampling.get("top_p") or 1.0),
                        stop_tokens=sorted(stops),
                        pad_token_id=self._tok.pad_token_id,
                        seed=start,
                    )
                )
                for row, i in zip(tokens, chunk):
                    kept = []
                    for t in row.tolist():
                        kept.append(t)
                        if t in stops:
                            break
                    text = postprocess_generated_text(self.tok_decode(kept), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- entry points


def register() -> None:
    """Register :class:`JaxclLM` as lm-eval's model ``jaxcl`` (done on import). By import path,
    so that ``python -m jaxcl.eval.harness`` (this module as ``__main__``) resolves it to this
    module's class and a second import registers nothing new."""
    from jaxcl._lm_eval_hook import register_jaxcl

    register_jaxcl()


register()


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``jaxcl`` model registered (``python -m
    jaxcl.eval.harness --model jaxcl --model_args preset=tiny --tasks ...``)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
