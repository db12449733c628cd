"""Run lm-evaluation-harness tasks on jaxcl parameters, offline: :func:`run_lm_eval` (what the
trainer's ``probes.lm_eval`` and ``jaxcl eval --lm-eval`` call), the task index over local task
YAMLs, and lm-eval's results as ``{task: {metric: value}}``."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lm_eval

from jaxcl.eval.harness import DEFAULT_BATCH_SIZE, JaxclLM
from jaxcl.eval.lm_eval_tasks import bundled_task_dir
from jaxcl.models.config import ModelConfig

OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face libraries offline for the duration (datasets from local files or the
    cache only): the environment variables, and the flags of modules read at import."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(dict.fromkeys(OFFLINE_ENV, "1"))
    flags = []
    for module, attr in (
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr):
            flags.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in flags:
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_TASK_MANAGERS: dict[tuple, Any] = {}


def task_manager(include_path: str | Sequence[str] | None = None, include_defaults: bool = True):
    """lm-eval's ``TaskManager`` over its own tasks (``include_defaults``), jaxcl's bundled
    tasks (:mod:`jaxcl.eval.lm_eval_tasks`) and ``include_path`` (a folder of task YAMLs, or
    several), built once per process (indexing lm-eval's ~15,000 task files takes seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, str | Path) else list(include_path or [])
    paths = [bundled_task_dir(), *paths]
    key = (tuple(str(Path(p).resolve()) for p in paths), include_defaults)
    if key not in _TASK_MANAGERS:
        missing = [p for p in paths if not Path(p).is_dir()]
        if missing:
            raise FileNotFoundError(f"lm-eval include_path {missing[0]} is not a folder")
        _TASK_MANAGERS[key] = TaskManager(
            include_path=[str(p) for p in paths] or None, include_defaults=include_defaults
        )
    return _TASK_MANAGERS[key]


def metric_table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``simple_evaluate``'s ``results``: lm-eval's keys
    ``metric,filter`` become ``metric`` (filter ``none``) or ``metric/filter``; non-numbers
    (aliases, ``N/A`` standard errors) are dropped."""
    table: dict[str, dict[str, float]] = {}
    for task, entry in results.get("results", {}).items():
        row = {}
        for key, value in entry.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, _, flt = key.partition(",")
            row[metric if flt in ("", "none") else f"{metric}/{flt}"] = float(value)
        table[task] = row
    return table


def run_lm_eval(
    params: Any,
    cfg: ModelConfig,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    include_path: str | Sequence[str] | None = None,
    include_defaults: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mesh: Any = None,
    rules: Any = None,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    offline_mode: bool = True,
    return_raw: bool = False,
) -> dict[str, dict[str, float]]:
    """Score ``params`` (a pure-dict parameter tree of the model ``cfg`` describes, per-layer
    or stacked as ``cfg.scan_layers`` says, placed anywhere) on lm-eval ``tasks`` through
    :class:`JaxclLM`; returns ``{task: {metric: value}}`` (:func:`metric_table`), or
    lm-eval's whole result dict when ``return_raw``.

    ``tasks``: lm-eval task or group names, including those of the YAMLs under
    ``include_path``; ``include_defaults=False`` skips indexing lm-eval's own task files (local
    tasks only). ``limit``: documents per task (an int, or a fraction). ``mesh``/``rules``:
    the recipe's mesh and logical rules (parameters and batches are sharded by them). With
    ``offline_mode`` (default) nothing is downloaded: datasets come from local files or the
    Hugging Face cache. Standard errors are not bootstrapped (``bootstrap_iters=0``).
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError("run_lm_eval: name at least one lm-eval task")
    with offline() if offline_mode else contextlib.nullcontext():
        lm = JaxclLM(
            params=params,
            config=cfg,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            mesh=mesh,
            rules=rules,
        )
        manager = task_manager(include_path, include_defaults)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            where = f" (nor under {include_path})" if include_path else ""
            raise ValueError(f"unknown lm-eval tasks {unknown}: not lm-eval tasks{where}")
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=manager,
            log_samples=return_raw,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return results if return_raw else metric_table(results)
