"""Hugging Face and GGUF inputs are parsed strictly: a mistyped config field, a non-float weight
or a mistyped GGUF metadata field fails ``jaxcl convert`` with exit status 2 and one message
naming the file and the field or tensor, never a traceback and never a silently changed model.
And converting a GGUF file to an HF directory needs no torch."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxcl.cli import main
from jaxcl.models import from_pretrained, load_tokenizer, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    save_pretrained(from_pretrained("test-micro"), out)
    return out


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    save_pretrained(from_pretrained("test-micro", seed=1), path)
    return path


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _convert(src, tmp_path, capsys) -> tuple[int, str]:
    """``jaxcl convert SRC OUT`` in this process: ``(exit status, stderr)``. An uncaught
    exception would fail the test here rather than print a traceback."""
    code = main(["convert", str(src), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def _assert_names(err: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in the message:\n{err}"


# (id, fields changed in config.json, fragments the message must hold)
BAD_CONFIGS = [
    (
        "tie-string",
        {"tie_word_embeddings": "false"},
        ["field 'tie_word_embeddings' must be a JSON boolean", "the string 'false'"],
    ),
    ("layers-fraction", {"num_hidden_layers": 2.5}, ["field 'num_hidden_layers'", "got 2.5"]),
    # 2.0 is refused too: an integer field takes a JSON integer (docs/models.md).
    ("layers-float", {"num_hidden_layers": 2.0}, ["field 'num_hidden_layers'", "got 2.0"]),
    ("layers-bool", {"num_hidden_layers": True}, ["field 'num_hidden_layers'", "got true"]),
    ("layers-zero", {"num_hidden_layers": 0}, ["field 'num_hidden_layers' must be > 0"]),
    (
        "eps-string",
        {"rms_norm_eps": "small"},
        ["field 'rms_norm_eps' must be a JSON number", "the string 'small'"],
    ),
    ("eps-negative", {"rms_norm_eps": -1e-5}, ["field 'rms_norm_eps' must be > 0"]),
    ("theta-string", {"rope_theta": "1e4"}, ["field 'rope_theta' must be a JSON number"]),
    (
        "rope-list",
        {"rope_parameters": [10000.0, "default"]},
        ["field 'rope_parameters' must be a JSON object", "a list"],
    ),
    (
        "rope-factor-string",
        {"rope_parameters": {"rope_type": "linear", "factor": "8"}},
        ["field 'rope_parameters.factor' must be a JSON number"],
    ),
    (
        "rope-factor-missing",
        {"rope_parameters": {"rope_type": "linear"}},
        ["missing field 'rope_parameters.factor'"],
    ),
    (
        "rope-type-unknown",
        {"rope_scaling": {"type": "yarn", "factor": 4.0}},
        ["field 'rope_scaling.type' is 'yarn'"],
    ),
    ("bias-int", {"attention_bias": 1}, ["field 'attention_bias' must be a JSON boolean"]),
    ("vocab-string", {"vocab_size": "384"}, ["field 'vocab_size' must be a JSON integer"]),
    ("hidden-null", {"hidden_size": None}, ["missing field 'hidden_size'"]),
    ("eos-string", {"eos_token_id": "2"}, ["field 'eos_token_id' must be a token id"]),
    ("eos-list-of-strings", {"eos_token_id": [1, "2"]}, ["field 'eos_token_id'"]),
    ("kv-heads", {"num_key_value_heads": 3}, ["'num_attention_heads' (4) must be a multiple"]),
    (
        "quantized",
        {"quantization_config": {"quant_method": "bitsandbytes"}},
        ["field 'quantization_config' (bitsandbytes) is not supported"],
    ),
    ("act-list", {"hidden_act": ["silu"]}, ["field 'hidden_act' must be a JSON string"]),
]


@pytest.mark.parametrize(
    ("changes", "fragments"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_field_exits_2_naming_file_and_field(
    good_dir, tmp_path, capsys, changes, fragments
):
    d = _copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    code, err = _convert(d, tmp_path, capsys)
    assert code == 2
    _assert_names(err, f"{d / 'config.json'}: ", *fragments)
    assert not (tmp_path / "out").exists()


def test_every_bad_field_is_named_at_once(good_dir, tmp_path, capsys):
    d = _copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    bad = {
        "tie_word_embeddings": "false",
        "num_hidden_layers": 2.5,
        "rms_norm_eps": "small",
        "rope_parameters": [1],
        "num_key_value_heads": 3,
    }
    (d / "config.json").write_text(json.dumps({**cfg, **bad}))
    code, err = _convert(d, tmp_path, capsys)
    assert code == 2
    _assert_names(err, f"{d / 'config.json'}: 5 problems", *(f"'{k}'" for k in bad))


@pytest.mark.parametrize(
    "text", ["[]", '[{"model_type": "llama"}]', '"llama"', "3", "{not json", b"\xff\xfe{}"]
)
def test_config_that_is_not_a_json_object(good_dir, tmp_path, capsys, text):
    d = _copy(good_dir, tmp_path)
    path = d / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = _convert(d, tmp_path, capsys)
    assert code == 2
    _assert_names(err, f"{path}: ")
    assert "must be a JSON object" in err or "not valid JSON" in err


def test_unknown_fields_and_json_numbers_are_accepted(good_dir, tmp_path, capsys):
    """Extra keys are normal in HF configs; an integer is a valid number; null optional fields
    are absent. The model converts unchanged."""
    d = _copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(
        rope_parameters={"rope_type": "default", "rope_theta": 10000},  # an int where a float is
        rms_norm_eps=1e-5,
        head_dim=None,
        sliding_window=None,
        eos_token_id=[1, 2],
        some_future_field={"anything": ["goes"]},
    )
    (d / "config.json").write_text(json.dumps(cfg))
    code, _ = _convert(d, tmp_path, capsys)
    assert code == 0
    back = from_pretrained(tmp_path / "out").config
    assert back.rope_theta == 10000.0 and back.eos_token_id == (1, 2)
    assert back.num_params() == from_pretrained("test-micro").config.num_params()


def test_tied_string_no_longer_drops_lm_head(good_dir, tmp_path, capsys):
    """The issue's case: ``"false"`` tied the embeddings (98,624 parameters instead of 123,200)
    and dropped ``lm_head.weight``; now it is refused, and ``false`` keeps all 123,200."""
    assert from_pretrained(good_dir).config.num_params() == 123_200
    d = _copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": "false"}))
    assert _convert(d, tmp_path, capsys)[0] == 2


WEIGHT_DTYPES = [
    ("bool", np.bool_, "BOOL"),
    ("int8", np.int8, "I8"),
    ("int32", np.int32, "I32"),
    ("uint8", np.uint8, "U8"),
    ("float8", ml_dtypes.float8_e4m3fn, "F8_E4M3"),
]


@pytest.mark.parametrize(
    ("dtype", "stored"), [w[1:] for w in WEIGHT_DTYPES], ids=[w[0] for w in WEIGHT_DTYPES]
)
def test_non_float_weight_exits_2_naming_file_and_tensor(good_dir, tmp_path, capsys, dtype, stored):
    d = _copy(good_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors[Q_PROJ] = tensors[Q_PROJ].astype(dtype)
    save_file(tensors, d / "model.safetensors")
    code, err = _convert(d, tmp_path, capsys)
    assert code == 2
    _assert_names(err, f"{d / 'model.safetensors'}: tensor '{Q_PROJ}' is stored as {stored}")


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_float_weights_load(good_dir, tmp_path, capsys, dtype):
    d = _copy(good_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    save_file({k: v.astype(dtype) for k, v in tensors.items()}, d / "model.safetensors")
    assert _convert(d, tmp_path, capsys)[0] == 0


def test_bad_index_names_the_field(good_dir, tmp_path, capsys):
    d = _copy(good_dir, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    code, err = _convert(d, tmp_path, capsys)
    assert code == 2
    _assert_names(err, "model.safetensors.index.json: field 'weight_map'")


def _rewrite_gguf(src: Path, dst: Path, *, fields=None, tensor=None) -> Path:
    """A copy of a GGUF file with metadata ``fields`` replaced (``{key: (value, GGUFValueType)}``)
    and the tensor ``tensor = (name, numpy dtype)`` cast."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if fields and key in fields:
            value, vtype = fields[key]
            writer.add_key_value(key, value, vtype)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if tensor and t.name == tensor[0]:
            data = data.astype(tensor[1])
        writer.add_tensor(t.name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_gguf_integer_tensor_exits_2_naming_it(good_gguf, tmp_path, capsys):
    path = _rewrite_gguf(good_gguf, tmp_path / "int.gguf", tensor=("blk.0.attn_q.weight", np.int8))
    code, err = _convert(path, tmp_path, capsys)
    assert code == 2
    _assert_names(err, f"{path}: tensor 'blk.0.attn_q.weight' is stored as I8")


@pytest.mark.parametrize(
    ("key", "value", "vtype", "fragment"),
    [
        ("llama.block_count", "2", "STRING", "'llama.block_count' must be an integer"),
        ("llama.rope.freq_base", "1e4", "STRING", "'llama.rope.freq_base' must be a number"),
        ("llama.embedding_length", True, "BOOL", "'llama.embedding_length' must be an integer"),
        ("llama.attention.head_count_kv", 3, "UINT32", "'llama.attention.head_count_kv' (3)"),
        ("llama.feed_forward_length", 0, "UINT32", "'llama.feed_forward_length' must be > 0"),
    ],
)
def test_gguf_bad_metadata_exits_2_naming_field(
    good_gguf, tmp_path, capsys, key, value, vtype, fragment
):
    import gguf

    fields = {key: (value, getattr(gguf.GGUFValueType, vtype))}
    path = _rewrite_gguf(good_gguf, tmp_path / "bad.gguf", fields=fields)
    code, err = _convert(path, tmp_path, capsys)
    assert code == 2
    _assert_names(err, f"{path}: ", fragment)


def test_module_cli_prints_no_traceback(good_dir, tmp_path):
    """The same through ``python -m jaxcl.cli``, as a user runs it."""
    d = _copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2.5}))
    proc = subprocess.run(
        [sys.executable, "-m", "jaxcl.cli", "convert", str(d), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_names(proc.stderr, f"{d / 'config.json'}: field 'num_hidden_layers'")


# --- GGUF -> HF without torch ---------------------------------------------------------------


def _byte_level_vocab(size: int) -> tuple[list[str], list[str], list[int]]:
    """A small GPT-2 style byte-level BPE vocabulary: the 256 byte symbols, three control tokens
    and merges of letter pairs, ``size`` tokens in all; ``(tokens, merges, token types)``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    letters = "etaoinshrdlucmfw"
    pairs = [(a, b) for a in letters for b in letters][: size - len(symbols) - len(specials)]
    merges = [f"{a} {b}" for a, b in pairs]
    tokens = symbols + specials + [a + b for a, b in pairs]
    types = [1] * len(symbols) + [3] * len(specials) + [1] * len(pairs)
    return tokens, merges, types


@pytest.fixture(scope="module")
def gguf_with_tokenizer(good_gguf, tmp_path_factory):
    import gguf

    tokens, merges, types = _byte_level_vocab(384)
    array = gguf.GGUFValueType.ARRAY
    reader = gguf.GGUFReader(str(good_gguf))
    path = tmp_path_factory.mktemp("tok") / "chat.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
            continue
        writer.add_key_value(key, field.contents(), field.types[0])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_key_value(
        "tokenizer.ggml.token_type", types, array, sub_type=gguf.GGUFValueType.INT32
    )
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


NO_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    from jaxcl.cli import main
    code = main(["convert", sys.argv[1], sys.argv[2]])
    leaked = sorted(m for m in sys.modules if m.startswith("torch."))
    assert not leaked, leaked
    sys.exit(code)
    """
)


def test_gguf_to_hf_conversion_needs_no_torch(gguf_with_tokenizer, tmp_path):
    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(gguf_with_tokenizer), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    # The output loads, with the GGUF's weights and tokenizer.
    ids = jnp.asarray(np.arange(3, 23).reshape(2, 10))
    np.testing.assert_allclose(
        from_pretrained(out)(ids), from_pretrained(gguf_with_tokenizer)(ids), atol=1e-5
    )
    tok = load_tokenizer(out)
    text = "<|im_start|>user\nthe heart is near<|im_end|>"
    assert tok(text)["input_ids"] == load_tokenizer(gguf_with_tokenizer)(text)["input_ids"]
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_gguf_tokenizer_matches_transformers_gguf_loader(gguf_with_tokenizer):
    """The torch-free tokenizer is the one ``AutoTokenizer(gguf_file=)`` builds (that one
    imports torch, so this oracle runs only where torch is installed)."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    ours = load_tokenizer(gguf_with_tokenizer)
    theirs = AutoTokenizer.from_pretrained(
        str(gguf_with_tokenizer.parent), gguf_file=gguf_with_tokenizer.name, local_files_only=True
    )
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert ours.special_tokens_map == theirs.special_tokens_map
    msgs = [{"role": "user", "content": "the sun is hot"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=True) == (
        theirs.apply_chat_template(msgs, add_generation_prompt=True)
    )
    for text in ["the heart is near", "<|im_start|>hi<|im_end|>", " ünï\tcode\n"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
