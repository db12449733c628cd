"""Streamed task data: packing, token accounting, budgets, resume state, process shards.

Oracles: the raw text's UTF-8 byte count (the byte tokenizer is one token per byte), the model
run on each document alone, a numpy count of the documents each process reads.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcl.data.budget import task_budget
from jaxcl.data.spec import DataSpec
from jaxcl.data.stream import RowStream, Skipped, StreamState, make_task_stream
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.recipe import TaskSpec

ROOT = Path(__file__).parent.parent
TOK = ByteTokenizer()


def _corpus(path: Path, n: int = 40, seed: int = 0, longest: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, longest)))) for _ in range(n)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return texts


def _data(path: Path, **extra) -> DataSpec:
    source = {"type": "jsonl", "kind": "text", "train": str(path), "eval": str(path)}
    return DataSpec(source=source, **extra)


def _epoch(data, packing, *, seq_len=32, batch=4, epochs=1.0, shard=(0, 1), seed=3):
    docs = data.documents(TOK, seq_len)
    task = TaskSpec(name="t", data=data, epochs=epochs)
    budget = task_budget(
        task,
        1,
        docs=docs,
        packing=packing,
        batch_size=batch,
        seq_len=seq_len,
        seed=seed,
        process_count=shard[1],
    )
    stream = make_task_stream(
        docs,
        packing=packing,
        seq_len=seq_len,
        batch_size=batch,
        seed=seed,
        budget=budget,
        shard=shard,
    )
    return budget, [stream.next_batch() for _ in range(budget.steps)], stream


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_one_epoch_trains_every_token_plus_one_eos_per_document(tmp_path, packing):
    texts = _corpus(tmp_path / "c.jsonl")
    expected = sum(len(t.encode("utf-8")) + 1 for t in texts)  # the text and its eos
    budget, batches, stream = _epoch(_data(tmp_path / "c.jsonl"), packing)
    trained = sum(int(b["loss_mask"].sum()) for b in batches)
    assert trained == expected == stream.state()["tokens"]
    assert stream.state()["doc"] == len(texts)  # the stream stopped at the epoch's end
    # no trailing batch wasted: the last one holds targets
    assert batches[-1]["loss_mask"].sum() > 0


def test_concat_rows_are_the_token_stream_cut_with_one_token_overlap(tmp_path):
    _corpus(tmp_path / "c.jsonl", n=12)
    _, batches, _ = _epoch(_data(tmp_path / "c.jsonl"), "concat", seq_len=16, batch=2)
    rows = np.concatenate([b["tokens"] for b in batches])
    masks = np.concatenate([b["loss_mask"] for b in batches])
    real = masks.sum(axis=1) > 0
    rows = rows[real]
    for a, b in zip(rows[:-1], rows[1:]):
        assert a[-1] == b[0]  # row k+1 starts on row k's last token
    assert (masks[:, 0] == 0).all()


def test_segments_give_each_document_the_logits_it_gets_alone(tmp_path):
    from jaxcl.models.config import preset
    from jaxcl.models.llama import Decoder

    texts = _corpus(tmp_path / "c.jsonl", n=14, seed=1, longest=30)  # some longer than a row
    model = Decoder(preset("test-micro"), rngs=nnx.Rngs(0))
    _, batches, _ = _epoch(_data(tmp_path / "c.jsonl"), "segments", seq_len=96, batch=2)
    ids = {tuple([TOK.bos_token_id, *TOK.encode(t), TOK.eos_token_id]) for t in texts}
    checked = 0
    for batch in batches:
        logits = model(
            jnp.asarray(batch["tokens"]),
            positions=jnp.asarray(batch["positions"]),
            segment_ids=jnp.asarray(batch["segment_ids"]),
        )
        for r in range(batch["tokens"].shape[0]):
            seg = batch["segment_ids"][r]
            for s in set(seg.tolist()) - {0}:
                where = np.flatnonzero(seg == s)
                doc = tuple(batch["tokens"][r, where].tolist())
                if doc not in ids:  # a piece of a document longer than the row
                    continue
                alone = model(jnp.asarray([doc]))[0]
                np.testing.assert_allclose(logits[r, where], alone, atol=2e-5, rtol=2e-5)
                checked += 1
    assert checked >= 5


def test_a_restored_stream_continues_on_the_very_next_row(tmp_path):
    _corpus(tmp_path / "c.jsonl", n=30)
    data = _data(tmp_path / "c.jsonl")
    for packing in ("none", "concat", "segments"):
        make = lambda packing=packing: make_task_stream(  # noqa: E731
            data.documents(TOK, 16), packing=packing, seq_len=16, batch_size=4, seed=5
        )
        whole = make()
        expected = [whole.next_batch() for _ in range(25)]  # more than one epoch
        first = make()
        for _ in range(11):
            first.next_batch()
        state = json.loads(json.dumps(first.state()))  # as a checkpoint's manifest holds it
        resumed = make()
        resumed.restore(state)
        for want in expected[11:]:
            got = resumed.next_batch()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_disjoint_documents_whose_union_is_the_epoch(tmp_path):
    """Two OS processes each drain their share of one concat epoch; every document is read by
    exactly one of them."""
    texts = _corpus(tmp_path / "c.jsonl", n=37)
    script = textwrap.dedent(
        f"""
        import json, sys
        from jaxcl.data.spec import DataSpec
        from jaxcl.data.budget import task_budget
        from jaxcl.data.stream import make_task_stream
        from jaxcl.models.tokenizer import ByteTokenizer
        from jaxcl.recipe import TaskSpec
        p = int(sys.argv[1])
        path = {str(tmp_path / "c.jsonl")!r}
        data = DataSpec(source={{"type": "jsonl", "kind": "text", "train": path, "eval": path}})
        docs = data.documents(ByteTokenizer(), 16)
        budget = task_budget(TaskSpec(name="t", data=data, epochs=1), 1, docs=docs,
                             packing="concat", batch_size=4, seq_len=16, seed=9, process_count=2)
        stream = make_task_stream(docs, packing="concat", seq_len=16, batch_size=4, seed=9,
                                  budget=budget, shard=(p, 2))
        tokens = [stream.next_batch() for _ in range(budget.steps)]
        from jaxcl.data.stream import DocumentOrder
        o = DocumentOrder(len(docs), 9, (p, 2))
        read = [o[q] for q in range(stream.state()["doc"])]
        got = {{"read": read, "tokens": stream.state()["tokens"], "steps": budget.steps}}
        print(json.dumps(got))
        """
    )
    outs = []
    for p in (0, 1):
        run = subprocess.run(
            [sys.executable, "-c", script, str(p)], capture_output=True, text=True, cwd=ROOT
        )
        assert run.returncode == 0, run.stderr[-2000:]
        outs.append(json.loads(run.stdout.strip().splitlines()[-1]))
    a, b = (set(o["read"]) for o in outs)
    assert not a & b
    assert a | b == set(range(len(texts)))
    assert outs[0]["steps"] == outs[1]["steps"]  # both processes run the same steps
    total = sum(len(t.encode("utf-8")) + 1 for t in texts)
    # each process trains its documents' tokens (its first token opens its stream)
    assert outs[0]["tokens"] + outs[1]["tokens"] == total


def test_budgets_epochs_and_tokens_give_the_promised_steps(tmp_path):
    texts = _corpus(tmp_path / "c.jsonl", n=25)
    data = _data(tmp_path / "c.jsonl")
    docs = data.documents(TOK, 16)

    def steps(packing, **budget):
        task = TaskSpec(name="t", data=data, **budget)
        b = task_budget(task, 7, docs=docs, packing=packing, batch_size=4, seq_len=16, seed=0)
        return b.steps

    assert steps("none") == 7  # the stage's default
    assert steps("none", steps=3) == 3
    assert steps("none", epochs=2) == -(-2 * 25 // 4)
    assert steps("concat", tokens=1000) == -(-1000 // (4 * 16))
    stream_tokens = 2 * sum(len(t.encode("utf-8")) + 2 for t in texts)  # bos, text, eos
    rows = -(-(stream_tokens - 1) // 16)  # rows overlap by one token
    assert steps("concat", epochs=2) == -(-rows // 4)


def test_bad_rows_are_skipped_and_counted_or_stop_naming_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    _corpus(path, n=20)
    lines = path.read_text().splitlines()
    lines[13] = '{"text": broken'
    path.write_text("\n".join(lines) + "\n")
    good = tmp_path / "eval.jsonl"
    _corpus(good, n=5)
    src = {"type": "jsonl", "kind": "text", "train": str(path), "eval": str(good)}
    skip = DataSpec(source=src, on_bad_row="skip")
    _, _, stream = _epoch(skip, "concat")
    state = stream.state()
    assert state["skipped"] == 1 and "line 14" in state["bad_rows"][0]
    strict = DataSpec(source=src)
    docs = strict.documents(TOK, 32)
    stream = make_task_stream(docs, packing="concat", seq_len=32, batch_size=4, seed=0)
    from jaxcl.data.sources import BadRowError

    with pytest.raises(BadRowError, match=r"c\.jsonl, line 14"):
        for _ in range(40):
            stream.next_batch()


def test_row_stream_skips_and_counts_bad_documents():
    docs = [
        (np.arange(5, dtype=np.int32), np.ones(5, np.int8)),
        Skipped("f.jsonl, line 2", "malformed JSON"),
        (np.arange(3, dtype=np.int32), np.ones(3, np.int8)),
    ]

    def documents(start):
        return ((q, docs[q]) for q in range(start, len(docs)))

    rows = RowStream(documents, packing="concat", seq_len=7, pad_id=0, limit=3)
    row = rows.next_row()
    assert row["tokens"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows.state.skipped == 1 and rows.state.bad_rows == ["f.jsonl, line 2: malformed JSON"]
    assert StreamState.from_json(rows.state.to_json()) == rows.state


def test_none_packing_matches_the_in_memory_stream_of_earlier_versions():
    """Row g of ``packing: none`` is the g-th document of the seeded shuffle, as the in-memory
    ``batched_stream`` has always drawn it."""
    from jaxcl.data import batched_stream, encode_all

    data = DataSpec(bundled="cit/capitals", train_size=40)
    examples = data.load("train")
    encoded = encode_all(examples, "instruction", TOK, 32)
    old = batched_stream(encoded, batch_size=8, num_batches=12, seed=4)
    new = make_task_stream(
        data.documents(TOK, 32), packing="none", seq_len=32, batch_size=8, seed=4
    )
    for k in range(12):
        got = new.next_batch()
        np.testing.assert_array_equal(got["tokens"], old[k]["tokens"])
        np.testing.assert_array_equal(got["loss_mask"], old[k]["loss_mask"])


def test_epoch_counts_are_kept_in_the_run_folder_and_follow_the_file(tmp_path):
    """The counting pass of an ``epochs`` budget under packing runs once per data: a second
    budget reads the counts from OUT_DIR/cache (no document is read), and a rewritten source
    file gets a new cache entry."""
    from types import SimpleNamespace

    from jaxcl.train.data import lengths_cache

    path = tmp_path / "c.jsonl"
    texts = _corpus(path, n=25)
    data = _data(path)
    recipe = SimpleNamespace(out_dir=str(tmp_path / "run"))
    cache = lengths_cache(recipe, data, TOK, 16)
    assert cache is not None and cache.parent == tmp_path / "run" / "cache"
    task = TaskSpec(name="t", data=data, epochs=1)
    common = dict(packing="concat", batch_size=4, seq_len=16, seed=0, lengths_cache=cache)
    first = task_budget(task, 1, docs=data.documents(TOK, 16), **common)
    np.testing.assert_array_equal(np.load(cache), [len(t.encode("utf-8")) + 2 for t in texts])

    class Unreadable:  # the documents, if the second budget read any of them
        def __len__(self):
            return len(texts)

        def __getitem__(self, i):
            raise AssertionError("a cached count read a document")

    assert task_budget(task, 1, docs=Unreadable(), **common) == first
    _corpus(path, n=25, seed=1)  # rewritten: same rows, other lengths
    assert lengths_cache(recipe, _data(path), TOK, 16) != cache
    assert lengths_cache(recipe, _data(path), TOK, 32) != lengths_cache(
        recipe, _data(path), TOK, 16
    )


def test_packing_none_counts_the_documents_it_truncates(tmp_path):
    """Oracle: a document is cut when bos + text + eos is longer than the row (seq_len + 1
    positions: inputs and the shifted targets); the count the report's share comes from."""
    texts = _corpus(tmp_path / "c.jsonl", n=40, longest=12)
    _, _, stream = _epoch(_data(tmp_path / "c.jsonl"), "none", seq_len=32)
    longer = sum(1 for t in texts if len(t.encode("utf-8")) + 2 > 33)
    assert 0 < longer < len(texts)
    assert stream.state()["truncated"] == longer
