"""``convert_main`` (the ``jaxcl convert`` command) and the recipe's model section."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.convert import convert_main
from jaxcl.models import from_pretrained
from jaxcl.models.spec import ModelSpec


def test_convert_hf_to_gguf_and_back(tmp_path, capsys):
    pytest.importorskip("gguf")
    assert convert_main("test-qwen2", str(tmp_path / "hf")) == 0
    assert convert_main(str(tmp_path / "hf"), str(tmp_path / "m.gguf")) == 0
    assert convert_main(str(tmp_path / "m.gguf"), str(tmp_path / "back")) == 0
    assert "qwen2, 2 layers" in capsys.readouterr().out
    ids = jnp.asarray(np.arange(20).reshape(2, 10))
    np.testing.assert_allclose(
        from_pretrained(tmp_path / "back")(ids), from_pretrained("test-qwen2")(ids), atol=1e-5
    )


def test_convert_reports_bad_input(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    assert convert_main(str(tmp_path / "bad"), str(tmp_path / "out")) == 2
    assert "no config.json" in capsys.readouterr().err


def test_model_spec_source_and_flags(tmp_path):
    graphdef, params, names, tok = ModelSpec(source="test-llama3", scan_layers=True).build(0)
    assert params["layers"]["mlp"]["up"].shape == (2, 64, 128)
    assert names["layers"]["mlp"]["up"] == ("layers", "embed", "mlp")
    with pytest.raises(ValueError, match="model.source|neither a preset"):
        ModelSpec(source=str(tmp_path / "missing"))
    assert ModelSpec(preset="test-micro").name == "test-micro"
