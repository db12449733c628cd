"""Real sources: JSONL, Parquet, TFDS, in-memory, the TRACE and O-LoRA layouts, chat templates."""

import json
from pathlib import Path

import numpy as np
import pydantic
import pytest

from jaxcl.data import encode_all, encode_example
from jaxcl.data.layouts import OLORA_ORDERS, olora_tasks, read_olora, read_trace, trace_tasks
from jaxcl.data.sources import ExampleSource, FieldMap, JsonlReader, ParquetReader
from jaxcl.data.spec import DataSpec
from jaxcl.models.tokenizer import ByteTokenizer

FIX = Path(__file__).parent / "fixtures"
TOK = ByteTokenizer()


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_folder_with_field_mapping_and_holdout():
    spec = DataSpec(
        source={
            "type": "jsonl",
            "kind": "instruction",
            "train": str(FIX / "jsonl" / "qa"),
            "fields": {"prompt": "question", "response": "answer"},
        },
        eval_size=1,
    )
    assert spec.kind == "instruction"
    train, held = spec.load("train"), spec.load("eval")
    assert len(train) == 2 and len(held) == 1
    every = {e["prompt"]: e["response"] for e in train + held}
    assert every == {
        "capital of Zembla?": "Ostrova",
        "capital of Genovia?": "Pyrus",
        "capital of Elbonia?": "Mudgate",
    }
    assert spec.load("train") == train  # the holdout draw is seeded
    assert [e for e in spec.dataset("train")] == train
    src = {**spec.source.model_dump(), "eval": str(FIX / "jsonl" / "qa" / "part-1.jsonl")}
    ds = DataSpec(source=src).dataset("train")  # lazy Grain view of the files
    assert len(ds) == 3 and ds[2] == {"prompt": "capital of Elbonia?", "response": "Mudgate"}


def test_prompt_template_and_nested_fields(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [json.dumps({"q": {"text": "2+2"}, "a": "4"})])
    fm = FieldMap({"response": "a"}, prompt_template="Sum: {q[text]}=")
    ex = ExampleSource(JsonlReader(path), "instruction", fm)[0]
    assert ex == {"prompt": "Sum: 2+2=", "response": "4"}
    fm = FieldMap({"prompt": "q.text", "response": "a"})
    assert ExampleSource(JsonlReader(path), "instruction", fm)[0]["prompt"] == "2+2"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "broken",}'], r"bad\.jsonl, line 2: malformed JSON"),
        (['{"text": "ok"}', "", '{"body": "x"}'], r"bad\.jsonl, line 3: field 'text' .* missing"),
        (
            ['{"text": 42}'],
            r"bad\.jsonl, line 1: field 'text' \(the text\) must be a string, got int",
        ),
        (['{"text": null}'], r"bad\.jsonl, line 1: field 'text' \(the text\) is null"),
        (["[1, 2]"], r"bad\.jsonl, line 1: a record must be an object, got list"),
        ([""], r"bad\.jsonl: the dataset is empty"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, lines, message):
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    spec = DataSpec(source={"type": "jsonl", "kind": "text", "train": str(path)}, eval_size=1)
    with pytest.raises(ValueError, match=message):
        spec.load("train")


def test_mapped_field_missing_is_named_with_its_role(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [json.dumps({"question": "q?"})])
    src = {"type": "jsonl", "kind": "instruction", "train": str(path), "eval": str(path)}
    spec = DataSpec(source={**src, "fields": {"prompt": "question", "response": "answer"}})
    with pytest.raises(ValueError, match=r"qa\.jsonl, line 1: field 'answer' \(the response\)"):
        spec.load("eval")
    with pytest.raises(pydantic.ValidationError, match="chosen cannot be mapped"):
        DataSpec(source={**src, "fields": {"chosen": "x"}})


def test_parquet_source_and_schema_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"body": ["alpha", "beta", "gamma"], "n": [1, 2, 3]}), good)
    spec = DataSpec(
        source={
            "type": "parquet",
            "kind": "text",
            "train": str(good),
            "eval": str(good),
            "fields": {"text": "body"},
        }
    )
    assert [e["text"] for e in spec.load("train")] == ["alpha", "beta", "gamma"]
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"body": ["a", "b"]}), folder / "0.parquet")
    pq.write_table(pa.table({"body": ["c"]}), folder / "1.parquet")
    reader = ParquetReader(folder)
    assert len(reader) == 3 and reader.where(2).endswith("1.parquet, row 0")

    def load(fields):
        return ExampleSource(ParquetReader(good), "text", FieldMap(fields)).all()

    with pytest.raises(ValueError, match=r"good\.parquet: column 'text' \(the text\) is missing"):
        load({})
    with pytest.raises(ValueError, match=r"good\.parquet: column 'n' \(the text\) has type int64"):
        load({"text": "n"})
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["x", None]}), nulls)
    with pytest.raises(
        ValueError, match=r"nulls\.parquet, row 1: field 'text' \(the text\) is null"
    ):
        ExampleSource(ParquetReader(nulls), "text").all()
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
        ParquetReader(tmp_path / "junk.parquet")


def _tfds_builder(data_dir: Path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxclTinyReviews(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "text": tfds.features.Text(),
                        "label": tfds.features.ClassLabel(names=["negative", "positive"]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"text": f"review {i} was {'good' if i % 2 else 'bad'}", "label": i % 2}

    builder = JaxclTinyReviews(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def test_tfds_dataset_built_offline(tmp_path):
    builder = _tfds_builder(tmp_path / "tfds")
    common = {
        "type": "tfds",
        "kind": "instruction",
        "eval_split": "test",
        "prompt_template": "Review: {text}\nSentiment:",
        "fields": {"label": "label"},
        "label_names": ["negative", "positive"],
    }
    by_name = DataSpec(
        source={**common, "name": "jaxcl_tiny_reviews", "data_dir": str(tmp_path / "tfds")}
    )
    by_dir = DataSpec(source={**common, "builder_dir": str(builder.data_dir)})
    for spec in (by_name, by_dir):
        train = spec.load("train")
        assert len(train) == 6 and len(spec.load("eval")) == 2
        by_text = {e["prompt"]: e["response"] for e in train}
        assert by_text["Review: review 3 was good\nSentiment:"] == "positive"
        assert by_text["Review: review 2 was bad\nSentiment:"] == "negative"
    with pytest.raises(ValueError, match=r"tfds .*\[nope\]: cannot open"):
        DataSpec(
            source={**common, "builder_dir": str(builder.data_dir), "train_split": "nope"}
        ).load("train")


def test_memory_source_and_spec_validation():
    spec = DataSpec(
        source={
            "type": "memory",
            "kind": "preference",
            "train": [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3,
            "eval": [{"prompt": "p", "chosen": "a", "rejected": "b"}],
        },
        train_size=2,
    )
    assert spec.kind == "preference" and len(spec.load("train")) == 2
    assert len(spec.load("eval")) == 1
    assert DataSpec(bundled="cit/capitals", train_size=3).load("train") == DataSpec(
        bundled="cit/capitals", train_size=3
    ).load("train")
    with pytest.raises(pydantic.ValidationError, match="exactly one of bundled"):
        DataSpec(bundled="cit/capitals", source={"type": "memory", "kind": "text", "train": []})
    with pytest.raises(pydantic.ValidationError, match="exactly one of bundled"):
        DataSpec()
    with pytest.raises(pydantic.ValidationError, match="does not match any of the expected tags"):
        DataSpec(source={"type": "csv", "train": "x.csv"})
    with pytest.raises(ValueError, match="1 training examples and no eval location"):
        DataSpec(source={"type": "memory", "kind": "text", "train": [{"text": "a"}]}).load("eval")


def test_trace_layout_fixture():
    root = FIX / "trace"
    assert trace_tasks(root) == ["C-STANCE", "FOMC", "NumGLUE-cm"]  # the benchmark's order
    train = read_trace(root, "FOMC", "train")
    assert len(train) == 4 and train[0]["response"] == "hawkish"
    assert train[0]["prompt"].startswith("What is the monetary policy stance")
    assert train[0]["prompt"].endswith("\nStance:")
    spec = DataSpec(source={"type": "trace", "root": str(root), "task": "C-STANCE"})
    assert spec.kind == "instruction" and spec.load("eval")[0]["response"] == "中立"
    enc = encode_all(spec.load("train"), "instruction", TOK, 512)
    assert TOK.decode(enc[0]["tokens"][enc[0]["loss_mask"] == 1]) == "支持"
    with pytest.raises(ValueError, match=r"Py150/train\.json: missing; TRACE tasks under"):
        read_trace(root, "Py150", "train")


def test_trace_reader_names_bad_records(tmp_path):
    (tmp_path / "FOMC").mkdir()
    (tmp_path / "FOMC" / "train.json").write_text(
        '[{"prompt": "p", "answer": "a"}, {"prompt": "p"}]'
    )
    with pytest.raises(ValueError, match=r"train\.json, record 1: field 'answer' \(the response\)"):
        read_trace(tmp_path, "FOMC", "train")
    (tmp_path / "FOMC" / "eval.json").write_text('[{"prompt": "p", "answer": "a"},\n {"prompt"}]')
    with pytest.raises(ValueError, match=r"eval\.json, line 2: malformed JSON"):
        read_trace(tmp_path, "FOMC", "eval")


def test_olora_five_task_layout_fixture():
    root = FIX / "olora" / "CL_Benchmark"
    assert olora_tasks(root) == {
        "amazon": "SC",
        "yelp": "SC",
        "agnews": "TC",
        "dbpedia": "TC",
        "yahoo": "TC",
    }
    for order in (OLORA_ORDERS[1], OLORA_ORDERS[2], OLORA_ORDERS[3]):  # 4-6: the long benchmark
        assert set(order) <= set(olora_tasks(root))
    ex = read_olora(root, "agnews", "train")[0]
    assert ex["prompt"] == (
        "Task:TC\nDataset:agnews\n"  # O-LoRA's scripts: --add_task_name/--add_dataset_name True
        "What is the topic of the following paragraph? Choose one from the option.\n"
        "Option: World, Sports, Business, Science or Technology \n"
        "Title: Rovers win cup final\nText: The Rovers beat the Dockers 2-1 in extra time.\n"
        "\nAnswer:"
    )
    assert ex["response"] == "Sports"
    spec = DataSpec(source={"type": "olora", "root": str(root), "task": "amazon"})
    assert [e["response"] for e in spec.load("eval")] == ["negative"]
    assert spec.load("train")[0]["prompt"].startswith("Task:SC\nDataset:amazon\nWhat is the")
    bare = DataSpec(
        source={"type": "olora", "root": str(root), "task": "amazon", "task_prefix": False}
    )
    assert bare.load("train")[0]["prompt"].startswith("What is the sentiment")


def test_olora_label_outside_labels_json(tmp_path):
    folder = tmp_path / "TC" / "news"
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text('["World", "Sports"]')
    (folder / "train.json").write_text('[{"sentence": "s", "label": "Weather"}]')
    with pytest.raises(ValueError, match=r"train\.json, record 0: field 'label' is 'Weather'"):
        read_olora(tmp_path, "news", "train")


def _hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["Capital of Zembla? Ostrova.", "system user assistant Be brief.", "Say hi again"] * 20
    tok.train_from_iterator(corpus, trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return hf


def test_chat_messages_through_an_hf_chat_template():
    hf = _hf_tokenizer()
    spec = DataSpec(
        source={
            "type": "jsonl",
            "kind": "instruction",
            "train": str(FIX / "jsonl" / "chat.jsonl"),
            "eval": str(FIX / "jsonl" / "chat.jsonl"),
        }
    )
    chats = spec.load("train")
    enc = encode_all(chats, "instruction", hf, seq_len=96)
    first, second = enc
    rendered = hf.apply_chat_template(chats[0]["messages"], tokenize=False)
    n = int((first["tokens"] != hf.pad_token_id).sum())
    assert hf.decode(first["tokens"][:n]) == rendered  # the template's text, token for token
    assert hf.decode(first["tokens"][first["loss_mask"] == 1]) == "Ostrova.<|im_end|>\n"
    assert hf.decode(second["tokens"][second["loss_mask"] == 1]) == (
        "Hi!<|im_end|>\nHi again!<|im_end|>\n"
    )
    # Plain prompt/response data through the same HF tokenizer: batched, bos once, eos at end.
    pr = encode_example({"prompt": "Say", "response": " hi"}, "instruction", hf, 16)
    assert pr["tokens"][0] == hf.bos_token_id and (pr["tokens"] == hf.bos_token_id).sum() == 1
    assert hf.decode(pr["tokens"][pr["loss_mask"] == 1]) == " hi</s>"


def test_chat_with_the_byte_tokenizer_and_bad_messages():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    enc = encode_example({"messages": msgs}, "instruction", TOK, 64)
    trained = enc["tokens"][enc["loss_mask"] == 1]
    assert TOK.decode(trained) == "yo\n" and trained[-1] == TOK.eos_token_id
    assert TOK.decode(enc["tokens"]).startswith("<|user|>\nhi\n<|assistant|>\n")
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    with pytest.raises(ValueError, match=r"field 'messages\[1\]\.role' must be one of"):
        encode_example(bad, "instruction", TOK, 32)
    path_spec = DataSpec(
        source={
            "type": "memory",
            "kind": "instruction",
            "eval": [],
            "train": [{"messages": [{"role": "user", "content": "x"}]}] * 2,
        },
        eval_size=1,
    )
    with pytest.raises(ValueError, match=r"row \d: field 'messages' has no assistant message"):
        path_spec.load("train")
    assert np.asarray(enc["tokens"]).dtype == np.int32


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "p", "chosen": "same", "rejected": " same "},
            "line 2: chosen and rejected are identical",
        ),
        ({"prompt": "p", "chosen": "yes"}, r"line 2: field 'rejected' .* missing"),
    ],
)
def test_bad_preference_rows_name_file_and_line(tmp_path, row, message):
    good = {"prompt": "p", "chosen": "yes", "rejected": "no"}
    path = _jsonl(tmp_path / "prefs.jsonl", [json.dumps(good), json.dumps(row)])
    spec = DataSpec(source={"type": "jsonl", "kind": "preference", "train": str(path)}, eval_size=1)
    with pytest.raises(ValueError, match=rf"prefs\.jsonl, {message}"):
        spec.load("train")


@pytest.mark.parametrize(
    "kind, record, field",
    [
        ("instruction", {"prompt": "q", "response": ""}, "response"),
        ("instruction", {"prompt": "q", "response": "  \n"}, "response"),
        ("preference", {"prompt": "q", "chosen": "", "rejected": "no"}, "chosen"),
        ("preference", {"prompt": "q", "chosen": "yes", "rejected": " "}, "rejected"),
    ],
)
def test_an_empty_trained_field_is_refused_naming_file_and_line(tmp_path, kind, record, field):
    good = {"prompt": "q", "response": "a", "chosen": "yes", "rejected": "no"}
    path = _jsonl(tmp_path / "e.jsonl", [json.dumps(good), json.dumps(record)])
    spec = DataSpec(source={"type": "jsonl", "kind": kind, "train": str(path), "eval": str(path)})
    with pytest.raises(ValueError, match=rf"e\.jsonl, line 2: field '{field}' .* is empty"):
        spec.load("train")


def test_an_empty_prompt_or_document_is_kept(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [json.dumps({"prompt": "", "response": "a", "text": ""})])
    for kind in ("instruction", "text"):
        src = {"type": "jsonl", "kind": kind, "train": str(path), "eval": str(path)}
        assert len(DataSpec(source=src).load("train")) == 1
