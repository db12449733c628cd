"""The inputs, checks and leaf-by-leaf streaming behind ``jaxcl merge`` (:mod:`jaxcl.merging`).

* **Inputs**: an HF directory is read tensor by tensor through ``safetensors.safe_open``
  (memory-mapped), a jaxcl checkpoint leaf by leaf with Orbax's partial restore
  (:class:`HFInput`, :class:`CheckpointInput`, :func:`open_input`).
* **Checks**: inputs of other shapes or tokenizers are refused before any weight is read
  (:func:`check_shapes`, :func:`check_tokenizers`).
* **Placement**: without a mesh every tensor goes to the default device; with one
  (:class:`Placement`) each tensor is put with its parameter's ``NamedSharding``, from the logical
  axis names of jaxcl's model (``embed``, ``mlp``, ``heads``...) and the logical rules, as a
  recipe places its parameters (:mod:`jaxcl.parallel`).
* **Streaming**: :class:`Streamer` reads one tensor from every input, places it, merges it with
  :func:`jaxcl.methods.merge.merge_leaf` (jitted: on a mesh it runs on the sharded arrays, and
  every method gives the unsharded result) and gathers the merged tensor to the host only to
  write it; :func:`write_hf` and :func:`write_checkpoint` write the outputs. TIES' whole-vector
  trim first finds each model's cut in one streamed pass (:func:`model_cuts`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.methods.merge import NEEDS_BASE, merge_leaf
from jaxcl.methods.ties_trim import Cut, host_cut, path_str
from jaxcl.models import hf
from jaxcl.models.config import PRESETS, ModelConfig, to_hf_config

if TYPE_CHECKING:
    from jax.sharding import Mesh, NamedSharding

    from jaxcl.merging import MergeConfig


class MergeError(ValueError):
    """A merge config or inputs that cannot be merged; the one message names the field, or both
    inputs and the tensor."""


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Entry:
    """One tensor of the output: its HF name, jaxcl per-layer path, whether HF stores it
    transposed, and its shape in jaxcl's layout."""

    name: str
    path: tuple[Any, ...]
    transposed: bool
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        return path_str(self.path)

    def hf_shape(self, shape: tuple[int, ...]) -> list[int]:
        return list(shape[::-1] if self.transposed else shape)


def entries(cfg: ModelConfig) -> list[Entry]:
    """The tensors of ``cfg``'s HF state dict, grouped by kind then layer (so a stacked
    checkpoint's leaf is read once for all its layers)."""
    out = [
        Entry(name, path, transposed, tuple(shape[::-1]) if transposed else tuple(shape))
        for name, path, transposed, shape in hf.param_map(cfg)
    ]

    def order(e: Entry) -> tuple:
        if e.path[0] == "layers":
            return (1, e.path[2:], e.path[1])
        return (0, e.path, 0)

    return sorted(out, key=order)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class HFInput:
    """An HF directory read tensor by tensor through ``safe_open`` (memory-mapped)."""

    def __init__(self, label: str, directory: Path, stack: ExitStack):
        from safetensors import safe_open

        self.label, self.dir = label, directory
        self.config = hf.read_config(directory)
        self.files: dict[str, Any] = {}
        for path in hf._weight_files(directory):
            try:
                handle = stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as err:  # noqa: BLE001 - safetensors raises its own types
                raise MergeError(f"{path}: not a readable safetensors file ({err})") from None
            for name in handle.keys():
                self.files[name] = (handle, path)
        extra = {"lm_head.weight"} if self.config.tie_embeddings else set()
        self.names = {n for n in self.files if not n.endswith("rotary_emb.inv_freq")} - extra

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.dir

    def shape(self, e: Entry) -> tuple[int, ...] | None:
        if e.name not in self.files:
            return None
        shape = tuple(self.files[e.name][0].get_slice(e.name).get_shape())
        return shape[::-1] if e.transposed else shape

    def dtype(self, e: Entry) -> np.dtype:
        code = self.files[e.name][0].get_slice(e.name).get_dtype()
        if code not in hf.FLOAT_DTYPES:
            raise MergeError(f"{self.files[e.name][1]}: tensor {e.name!r} is {code}, not a float")
        return _dtype({"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(code, "float64"))

    def read(self, e: Entry) -> np.ndarray:
        handle, path = self.files[e.name]
        try:
            array = handle.get_tensor(e.name)
        except Exception as err:  # noqa: BLE001
            raise MergeError(f"{path}: tensor {e.name!r} cannot be read ({err})") from None
        return array.T if e.transposed else array


class CheckpointInput:
    """A jaxcl checkpoint step folder, read leaf by leaf with Orbax's partial restore."""

    def __init__(self, label: str, step_dir: Path, config: ModelConfig, tokenizer: Path | None):
        import orbax.checkpoint as ocp
        from etils import epath

        from jaxcl import checkpoint

        self.label, self.dir, self.config, self.tokenizer_dir = label, step_dir, config, tokenizer
        if checkpoint.read_manifest(step_dir).get("lora"):
            raise MergeError(
                f"{label}: a checkpoint of a LoRA stage (adapters beside the weights); export "
                "it as an HF directory first (its adapters folded in) and merge that"
            )
        self._ocp, self._folder = ocp, epath.Path((step_dir / "params").absolute())
        with checkpoint._settled_loops():
            meta = ocp.PyTreeCheckpointHandler().metadata(self._folder)
        tree = getattr(meta, "tree", meta)
        self.leaves = {
            tuple(checkpoint._leaf_key(p)): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for p, leaf in _flatten(tree)
        }
        self.stacked = not any(k[:2] == ("layers", "0") for k in self.leaves)
        self._cache: tuple[tuple, np.ndarray] | None = None

    def _where(self, e: Entry) -> tuple[tuple[str, ...], int | None]:
        keys = tuple(str(k) for k in e.path)
        if e.path[0] == "layers" and self.stacked:
            return ("layers", *keys[2:]), int(e.path[1])
        return keys, None

    def shape(self, e: Entry) -> tuple[int, ...] | None:
        key, layer = self._where(e)
        if key not in self.leaves:
            return None
        shape = self.leaves[key][0]
        return shape[1:] if layer is not None else shape

    def dtype(self, e: Entry) -> np.dtype:
        return self.leaves[self._where(e)[0]][1]

    @property
    def names(self) -> set[tuple[str, ...]]:
        return set(self.leaves)

    def read(self, e: Entry) -> np.ndarray:
        key, layer = self._where(e)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # one leaf held at a time
            self._cache = (key, self._restore(key))
        array = self._cache[1]
        return array[layer] if layer is not None else array

    def _restore(self, key: tuple[str, ...]) -> np.ndarray:
        from jaxcl import checkpoint

        ocp = self._ocp
        item: dict[str, Any] = {}
        node = item
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        try:
            with checkpoint._settled_loops():
                out = ocp.PyTreeCheckpointer().restore(
                    self._folder,
                    args=ocp.args.PyTreeRestore(item=item, restore_args=item, partial_restore=True),
                )
        except Exception as err:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
            raise MergeError(
                f"{self.dir}: leaf {'/'.join(key)} cannot be read ({checkpoint._reason(err)})"
            ) from None
        for k in key:
            out = out[k]
        return np.asarray(out)


def _flatten(tree: Any) -> list[tuple[tuple, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _is_checkpoint(path: Path) -> bool:
    return (path / "params").is_dir() and (path / "manifest").is_dir()


def _architecture(model: str | None, label: str) -> tuple[ModelConfig, Path | None]:
    if model is None:
        raise MergeError(
            f"model: {label} is a jaxcl checkpoint, which holds no architecture: name it with "
            "`model:` (a preset or an HF directory)"
        )
    if model in PRESETS:
        return PRESETS[model], None
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        return hf.read_config(path), path
    raise MergeError(f"model: {model!r} is neither a preset nor an HF directory (config.json)")


def open_input(label: str, model: str | None, stack: ExitStack) -> HFInput | CheckpointInput:
    path = Path(label).expanduser()
    if not path.exists():
        raise MergeError(f"{label}: no such file or directory")
    if _is_checkpoint(path):
        cfg, tokenizer = _architecture(model, label)
        return CheckpointInput(label, path, cfg, tokenizer)
    if path.is_dir() and (path / "config.json").is_file():
        return HFInput(label, path, stack)
    raise MergeError(
        f"{label}: neither an HF directory (config.json + safetensors) nor a jaxcl checkpoint "
        "step folder (OUT/checkpoints/<stage>/<step>)"
    )


# ----------------------------------------------------------------------------- checks


def check_shapes(ref: Any, others: Sequence[Any], plan: list[Entry]) -> None:
    """Refuse inputs whose tensors differ from the reference's in name or shape, naming both
    inputs and the tensor."""
    for src in [ref, *others]:
        for e in plan:
            got = src.shape(e)
            if got is None:
                raise MergeError(
                    f"models of different shapes: tensor {e.name} is in {ref.label} but not in "
                    f"{src.label}"
                )
            if got != e.shape:
                raise MergeError(
                    f"models of different shapes: tensor {e.name} is {e.hf_shape(e.shape)} in "
                    f"{ref.label} but {e.hf_shape(got)} in {src.label}"
                )
        if isinstance(src, HFInput):
            extra = sorted(src.names - {e.name for e in plan})
            if extra:
                raise MergeError(
                    f"models of different shapes: tensor {extra[0]} is in {src.label} but not "
                    f"in {ref.label}"
                )
        else:
            wanted = {src._where(e)[0] for e in plan}
            extra = sorted(src.names - wanted)
            if extra:
                raise MergeError(
                    f"models of different shapes: leaf {'/'.join(extra[0])} is in {src.label} "
                    f"but not in {ref.label}"
                )


def tokenizer_vocab(directory: Path | None) -> dict[str, int] | None:
    """The vocabulary (added tokens included) of the tokenizer in ``directory``; None when the
    folder holds no tokenizer files."""
    if directory is None or not any(
        (directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")
    ):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise MergeError(f"{directory}: its tokenizer cannot be loaded ({err})") from None
    return dict(tok.get_vocab())


def check_tokenizers(inputs: Sequence[Any]) -> None:
    """Refuse inputs whose tokenizers differ (vocabulary and ids), naming both: each is compared
    with the first input that has one. Inputs without tokenizer files are not compared (their
    shapes are)."""
    first, mine = None, None
    for src in inputs:
        if first is not None and src.tokenizer_dir == first.tokenizer_dir:
            continue
        theirs = tokenizer_vocab(src.tokenizer_dir)
        if theirs is None:
            continue
        if first is None:
            first, mine = src, theirs
            continue
        if theirs == mine:
            continue
        if len(theirs) != len(mine):
            why = f"{len(mine)} tokens against {len(theirs)}"
        else:
            token = sorted(t for t in mine.keys() | theirs.keys() if mine.get(t) != theirs.get(t))
            why = f"token {token[0]!r} is {mine.get(token[0])} against {theirs.get(token[0])}"
        raise MergeError(f"models with different tokenizers: {first.label} and {src.label} ({why})")


# ----------------------------------------------------------------------------- placement


class Placement:
    """Where each tensor of the merge lives: the default device (no mesh), or its parameter's
    ``NamedSharding`` on ``mesh``: the logical axis names of jaxcl's model for that parameter
    (per-layer layout) mapped by ``rules``, a mesh axis that does not divide a dimension dropped,
    as :func:`jaxcl.parallel.tree_shardings` places a recipe's parameters. ``report`` collects,
    per tensor, the input's and the merged output's sharding spec, the number of devices
    holding it and whether it is split (not replicated)."""

    def __init__(
        self, mesh: Mesh | None = None, rules: Any = None, config: ModelConfig | None = None
    ):
        self.mesh = mesh
        self.report: dict[str, dict[str, Any]] = {}
        self._shardings: dict[str, NamedSharding] = {}
        if mesh is None:
            return
        from flax import nnx

        from jaxcl import parallel
        from jaxcl.models.llama import Decoder

        if config is None:
            raise ValueError("a mesh needs the model's config (its parameters' logical names)")
        rules = [tuple(r) for r in rules] if rules else parallel.DEFAULT_RULES
        model = nnx.eval_shape(lambda: Decoder(config.replace(scan_layers=False), rngs=nnx.Rngs(0)))
        shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        tree = parallel.tree_shardings(parallel.param_logical_names(model), shapes, mesh, rules)
        for path, sharding in jax.tree_util.tree_leaves_with_path(tree):
            self._shardings[path_str(path)] = sharding

    @classmethod
    def build(cls, shape: dict[str, int] | None, rules: Any, config: ModelConfig) -> Placement:
        """A placement on a ``(data, fsdp, tensor)`` mesh of ``shape`` over this host's devices
        (None: the default device); a mesh the devices cannot form is a :class:`MergeError`."""
        if shape is None:
            return cls()
        from jaxcl import parallel

        try:
            mesh = parallel.make_mesh(shape)
        except ValueError as err:
            raise MergeError(f"mesh: {str(err).removeprefix('mesh: ')}") from None
        return cls(mesh, rules, config)

    def sharding(self, e: Entry) -> NamedSharding | None:
        """``e``'s sharding (replicated for a tensor the model does not name; None without a
        mesh)."""
        if self.mesh is None:
            return None
        from jax.sharding import NamedSharding, PartitionSpec

        return self._shardings.get(e.key) or NamedSharding(self.mesh, PartitionSpec())

    def put(self, array: np.ndarray, e: Entry) -> jax.Array:
        sharding = self.sharding(e)
        return jnp.asarray(array) if sharding is None else jax.device_put(array, sharding)

    def to_host(self, array: jax.Array, e: Entry) -> np.ndarray:
        """The merged tensor gathered to the host (recorded in ``report`` on a mesh)."""
        if self.mesh is None:
            return np.asarray(array)
        from jaxcl import parallel

        placed = self.sharding(e)
        self.report[e.key] = {
            "input": str(placed.spec),
            "output": str(array.sharding.spec),
            "devices": len(array.sharding.device_set),
            "split": not placed.is_fully_replicated,
        }
        return parallel.to_host(array)


# ----------------------------------------------------------------------------- streaming


@dataclass
class Streamer:
    """One merged tensor at a time: read from every input, placed, merged, brought back."""

    cfg: MergeConfig
    params: dict[str, Any]
    base: Any
    models: Sequence[Any]
    placement: Placement
    #: TIES with ``scope: model``: each model's cut of its whole task vector
    cuts: list[Cut] | None = None

    def merged(self, e: Entry) -> np.ndarray:
        cfg, put = self.cfg, self.placement.put
        base = self.base if cfg.method in NEEDS_BASE else None
        b = put(base.read(e), e) if base is not None else None
        leaves = [put(m.read(e), e) for m in self.models]
        out = merge_leaf(
            cfg.method,
            b,
            leaves,
            weights=[m.weight for m in cfg.models],
            path=e.key,
            seed=cfg.seed,
            cuts=self.cuts,
            **{k: v for k, v in self.params.items() if k != "scope"},
        )
        del b, leaves  # one tensor per input on the devices
        array = self.placement.to_host(out, e)
        if cfg.dtype:
            array = array.astype(_dtype(cfg.dtype))
        return array


def tree_order(plan: list[Entry]) -> list[int]:
    """The indices of ``plan`` in the per-layer parameter tree's flattened order (the order
    TIES' whole-vector trim breaks ties in, as :func:`jaxcl.methods.ties_trim.tree_cut` does)."""
    nested: dict[Any, Any] = {}
    for i, e in enumerate(plan):
        node = nested
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        node[e.path[-1]] = np.int64(i)
    return [int(i) for i in jax.tree.leaves(nested)]


def model_cuts(base: Any, models: Sequence[Any], plan: list[Entry], density: float) -> list[Cut]:
    """Each model's :class:`~jaxcl.methods.ties_trim.Cut` of its whole task vector ``θ_i − θ_b``:
    its magnitudes streamed tensor by tensor (in ``plan``'s order, so a stacked checkpoint leaf
    is read once) into one preallocated float32 buffer, at the offsets of the per-layer tree's
    order, then ``np.partition`` in place for the exact k-th largest. Host memory: that buffer
    (one model in float32) plus one tensor per input; the buffer is reused for every model."""
    order = tree_order(plan)
    sizes = [int(np.prod(e.shape)) for e in plan]
    offsets, start = [0] * len(plan), 0
    for i in order:
        offsets[i], start = start, start + sizes[i]
    buffer = np.empty(start, np.float32)

    def tau(m: Any, e: Entry, out: np.ndarray) -> np.ndarray:
        np.subtract(m.read(e).astype(np.float32), base.read(e).astype(np.float32), out=out)
        return np.abs(out, out=out)

    cuts = []
    for m in models:
        for i, e in enumerate(plan):
            tau(m, e, buffer[offsets[i] : offsets[i] + sizes[i]].reshape(e.shape))

        def leaf_ties(thr: float, m: Any = m) -> list[tuple[str, int]]:
            counts = {}  # read again in plan's order, listed in the tree's
            for e in plan:
                counts[e.key] = int(
                    np.count_nonzero(tau(m, e, np.empty(e.shape, np.float32)) == thr)
                )
            return [(plan[i].key, counts[plan[i].key]) for i in order]

        cuts.append(host_cut(buffer, density, leaf_ties))
    return cuts


def _shards(sizes: list[int], limit: float) -> list[list[int]]:
    shards, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and used + size > limit:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        shards.append(current)
    return shards


def write_hf(stream: Streamer, plan: list[Entry], ref: Any, tmp: Path) -> None:
    """The merged model as an HF directory in ``tmp``: safetensors of at most ``shard_gb``
    (each written as soon as its tensors are merged), the reference's config and tokenizer."""
    from safetensors.numpy import save_file

    cfg = stream.cfg
    first = stream.base or stream.models[0]
    out_dtype = [_dtype(cfg.dtype) if cfg.dtype else first.dtype(e) for e in plan]
    sizes = [int(np.prod(e.shape)) * d.itemsize for e, d in zip(plan, out_dtype)]
    shards = _shards(sizes, cfg.shard_gb * 1e9)
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for i in shard:
            e = plan[i]
            array = stream.merged(e)
            tensors[e.name] = np.ascontiguousarray(array.T if e.transposed else array)
            weight_map[e.name] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / hf.INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _write_config(cfg, ref, tmp, out_dtype)
    if ref.tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (ref.tokenizer_dir / name).is_file():
                shutil.copyfile(ref.tokenizer_dir / name, tmp / name)


def _write_config(cfg: MergeConfig, ref: Any, tmp: Path, dtypes: list[np.dtype]) -> None:
    """The reference's ``config.json`` (an HF input's as is), its dtype the written one."""
    dtype = cfg.dtype or (str(dtypes[0]) if dtypes else "float32")
    if isinstance(ref, HFInput):
        raw = json.loads((ref.dir / "config.json").read_text())
        raw["dtype"] = dtype
        if "torch_dtype" in raw:
            raw["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    else:
        to_hf_config(ref.config.replace(param_dtype=dtype)).save_pretrained(str(tmp))


def write_checkpoint(stream: Streamer, plan: list[Entry], tmp: Path) -> None:
    """The merged model as checkpoint ``OUT/checkpoints/merge/0`` (parameters only, per-layer
    layout), which ``jaxcl eval`` scores with a recipe of the same model."""
    from jaxcl.checkpoint import save_checkpoint

    tree: dict[str, Any] = {}
    for e in plan:
        node = tree
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        node[e.path[-1]] = stream.merged(e)
    manifest = {"stage": "merge", "step": 0, "task_index": 0, "task_done": True, "merge": True}
    placeholder = {"merged": np.zeros((), np.int32)}  # no optimizer state; Orbax wants an item
    save_checkpoint(tmp / "checkpoints" / "merge", 0, tree, placeholder, manifest)
