"""Recipe validation fails before any training, naming the field (and the valid choices)."""

from pathlib import Path

import pytest
import yaml

from jaxcl.recipe import RecipeError, apply_overrides, load_recipe

QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"


def _write(tmp_path, mutate):
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["out_dir"] = str(tmp_path / "run")
    mutate(raw)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_quickstart_validates_with_overrides():
    recipe = load_recipe(QUICKSTART, ["out_dir=/tmp/x", "stages.1.steps_per_task=7"])
    assert recipe.out_dir == "/tmp/x" and recipe.stages[1].steps_per_task == 7
    assert [s.kind for s in recipe.stages] == ["pretrain", "instruct", "align"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda r: r["stages"][0]["methods"][0].update(name="ewk"),
            r"stages\[0\]\.methods\[0\]\.name: unknown method ewk; "
            r"valid choices: ewc, l2_anchor, mas, si, recadam, agem, gem, ogd, gpm, o_lora, "
            r"freeze, packnet, soft_mask, replay, ssr, ema, elastic_reset, average, "
            r"task_arithmetic, hma, ties, dare, copr, block_expansion, new_tokens, inflora, "
            r"moe_lora, demix, "
            r"soft_prompt, progressive_prompts, l2p, sapt$",
        ),
        (
            lambda r: r["stages"][1].pop("steps_per_task"),
            r"stages\[1\]\.steps_per_task: Field required",
        ),
        (
            lambda r: r["stages"][2].update(batch_size="sixteen"),
            r"stages\[2\]\.batch_size: Input should be a valid integer",
        ),
        (
            lambda r: r["optimizer"].update(lr="fast"),
            r"optimizer\.lr: Input should be a valid number",
        ),
        (
            lambda r: r["model"].update(preset="gpt5"),
            r"model\.preset: unknown preset 'gpt5'; valid choices: tiny",
        ),
        (
            lambda r: r["stages"][0]["tasks"][0]["data"].update(bundled="cit/sentiment"),
            r"stages\[0\]: tasks\[0\] \(recipes\): its dataset holds instruction examples",
        ),
        (
            lambda r: r["stages"][0].update(epochs=3),
            r"stages\[0\]\.epochs: Extra inputs are not permitted",
        ),
        (
            lambda r: r["stages"][0]["methods"][0].update(lam=-1),
            r"stages\[0\]\.methods\[0\]\.lam: Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_recipes_fail_with_one_clear_message(tmp_path, mutate, expected):
    path = _write(tmp_path, mutate)
    with pytest.raises(RecipeError, match=expected) as info:
        load_recipe(path)
    assert str(path) in str(info.value)  # the file (and line) is named
    assert "Traceback" not in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing started


def test_error_points_at_the_yaml_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\nout_dir: /tmp/x\nstages:\n  - name: a\n    kind: pretrain\n"
        "    steps_per_task: 1\n    batch_size: 2\n    seq_len: 16\n    tasks:\n"
        "      - {name: t, data: {bundled: cpt/recipes}}\n    methods:\n      - {name: bogus}\n"
    )
    with pytest.raises(RecipeError, match=r"r\.yaml:12: stages\[0\]\.methods\[0\]\.name"):
        load_recipe(path)


def test_overrides_parse_yaml_values_and_reject_bad_paths():
    raw = {"a": {"b": 1}, "l": [{"x": 1}]}
    apply_overrides(raw, ["a.b=2.5", "l.0.x=[1, 2]", "a.c=true"])
    assert raw == {"a": {"b": 2.5, "c": True}, "l": [{"x": [1, 2]}]}
    with pytest.raises(RecipeError, match="not an index"):
        apply_overrides(raw, ["l.3.x=1"])
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_overrides(raw, ["nonsense"])


def test_unreadable_and_non_mapping_recipes(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(bad)
    ugly = tmp_path / "ugly.yaml"
    ugly.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(ugly)


def test_missing_data_path_fails_at_validation_naming_the_field(tmp_path):
    source = {"type": "jsonl", "kind": "instruction", "train": str(tmp_path / "nope.jsonl")}
    path = _write(tmp_path, lambda r: r["stages"][1]["tasks"][0].update(data={"source": source}))
    with pytest.raises(
        RecipeError,
        match=r"stages\[1\]\.tasks\[0\]\.data\.source\.train: path .*nope\.jsonl' does not exist",
    ):
        load_recipe(path)


def test_compare_variants_validate_before_training(tmp_path):
    recipe = load_recipe(
        QUICKSTART, [f"out_dir={tmp_path}", "compare={seqft: {stages.1.methods: []}}"]
    )
    variant = recipe.variant("seqft")
    assert variant.stages[1].methods == [] and variant.stages[0].methods == recipe.stages[0].methods
    assert variant.out_dir == str(tmp_path / "compare" / "seqft")
    for bad, message in [
        ("compare={x: {stages.0.epochs: 3}}", r"compare\.x: stages\[0\]\.epochs: Extra inputs"),
        (
            "compare={x: {stages.7.methods: []}}",
            r"compare\.x\.stages\.7\.methods: stages is a list of 3",
        ),
        (
            "compare={x: {optimizer.lr: fast}}",
            r"compare\.x: optimizer\.lr: Input should be a valid number",
        ),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(QUICKSTART, [bad])


def test_environment_references_in_recipe_strings(tmp_path, monkeypatch):
    """`${NAME}` / `${NAME:-default}` expand from the environment; an unset one without a
    default is an error naming the field."""
    from jaxcl.recipe import expand_env

    monkeypatch.setenv("JAXCL_TEST_ROOT", "/data/x")
    monkeypatch.delenv("JAXCL_TEST_UNSET", raising=False)
    raw = {"a": ["${JAXCL_TEST_ROOT}/t", {"b": "${JAXCL_TEST_UNSET:-dflt}/u"}], "n": 3}
    assert expand_env(raw, "r.yaml") == {"a": ["/data/x/t", {"b": "dflt/u"}], "n": 3}
    unset = r"r.yaml: a\[1\].b: environment variable JAXCL_TEST_UNSET is not set"
    with pytest.raises(RecipeError, match=unset):
        expand_env({"a": [0, {"b": "${JAXCL_TEST_UNSET}"}]}, "r.yaml")


@pytest.mark.parametrize("text", ["1e12", "1.25e4", "12345e0", "12345678e0", "3E5"])
def test_the_e_notation_hint_suggests_numbers_yaml_reads_as_the_same_value(text):
    """Oracle: PyYAML itself reads both suggested spellings back as the value meant."""
    import yaml

    from jaxcl.recipe import _e_notation_hint

    hint = _e_notation_hint(text)
    plain, exact = hint.split("; write ")[1].rstrip(")").split(" (or ")
    assert yaml.safe_load(plain) == yaml.safe_load(exact) == float(text)
    assert isinstance(yaml.safe_load(exact), float)  # not text: YAML took it as a number
