"""Packing: segment ids and positions keep documents apart, so packed logits equal solo logits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcl.data import encode_all, pack_examples, packing_efficiency
from jaxcl.data.benchmarks import generate
from jaxcl.models.config import preset
from jaxcl.models.llama import Decoder
from jaxcl.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _docs():
    texts = generate("cpt/recipes", "train", 3) + [{"text": "short"}]
    qa = generate("cit/capitals", "train", 3)
    return encode_all(texts, "text", TOK, 96) + encode_all(qa, "instruction", TOK, 96)


def test_pack_layout_segments_positions_and_masks():
    docs = _docs()
    rows = pack_examples(docs, 96)
    assert len(rows) < len(docs) and packing_efficiency(rows) > 0.6
    n_docs = sum(int(r["segment_ids"].max()) for r in rows)
    assert n_docs == len(docs)  # every document lands once, none is split
    for row in rows:
        seg, pos, mask = row["segment_ids"], row["positions"], row["loss_mask"]
        for s in range(1, int(seg.max()) + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all() and (pos[idx] == np.arange(idx.size)).all()
            assert mask[idx[0]] == 0  # never trained to predict a document from the previous one
        assert (row["tokens"][seg == 0] == TOK.pad_token_id).all() and mask[seg == 0].sum() == 0
    # The trained tokens are exactly those of the documents.
    assert sum(int(r["loss_mask"].sum()) for r in rows) == sum(
        int(d["loss_mask"].sum()) for d in docs
    )


def test_packed_logits_equal_documents_run_one_by_one():
    graphdef, state = nnx.split(Decoder(preset("test-micro"), rngs=nnx.Rngs(0)))
    model = jax.jit(
        lambda ids, positions=None, segment_ids=None: nnx.merge(graphdef, state)(
            ids, positions=positions, segment_ids=segment_ids
        )
    )
    docs = _docs()
    rows = pack_examples(docs, 96)
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    packed = np.asarray(
        model(
            batch["tokens"][:, :-1],
            positions=batch["positions"][:, :-1],
            segment_ids=batch["segment_ids"][:, :-1],
        )
    )
    # Every document alone in its own row (right padding is invisible to causal attention).
    solo = [
        row["tokens"][row["segment_ids"] == s]
        for row in rows
        for s in range(1, row["segment_ids"].max() + 1)
    ]
    solo_ids = np.zeros((len(solo), 96), np.int32)
    for i, d in enumerate(solo):
        solo_ids[i, : min(len(d), 96)] = d[:96]
    alone = np.asarray(model(jnp.asarray(solo_ids)))
    i = 0
    for r, row in enumerate(rows):
        seg = row["segment_ids"][:-1]
        for s in range(1, int(row["segment_ids"].max()) + 1):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_allclose(packed[r, idx], alone[i, : idx.size], atol=2e-5, rtol=2e-5)
            i += 1
    assert i == len(docs)
    # Without segment ids the second document of a row would see the first: logits differ.
    r = next(i for i, row in enumerate(rows) if row["segment_ids"].max() >= 2)
    idx = np.flatnonzero(rows[r]["segment_ids"][:-1] == 2)
    leaky = np.asarray(model(batch["tokens"][r : r + 1, :-1]))[0, idx]
    assert np.abs(leaky - packed[r, idx]).max() > 1e-3
