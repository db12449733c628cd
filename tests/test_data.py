"""Bundled data, encoding, batching and replay mixing."""

import numpy as np
import pytest

from jaxcl.data import ReplayMix, batched_stream, encode_all, encode_example, eval_batches
from jaxcl.data.benchmarks import GENERATORS, generate, kind_of
from jaxcl.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_generators_are_deterministic_and_splits_differ():
    for name in GENERATORS:
        a, b = generate(name, "train", 20), generate(name, "train", 20)
        assert a == b
        assert generate(name, "eval", 20) != a
    with pytest.raises(ValueError, match="valid names"):
        generate("cit/nope", "train", 3)


def test_at_least_two_domains_three_tasks_one_preference_set():
    kinds = [kind_of(n) for n in GENERATORS]
    assert kinds.count("text") >= 2 and kinds.count("instruction") >= 3
    assert kinds.count("preference") >= 1
    prompts = {
        generate(n, "train", 1)[0]["prompt"][:5] for n in GENERATORS if kind_of(n) == "instruction"
    }
    assert len(prompts) == kinds.count("instruction")  # distinct formats


def test_instruction_prompt_is_masked_out_of_the_loss():
    ex = {"prompt": "Q: capital of Zembla?\nA:", "response": " Ostrova"}
    enc = encode_example(ex, "instruction", TOK, seq_len=40)
    tokens, mask = enc["tokens"], enc["loss_mask"]
    n_prompt = 1 + len(TOK.encode(ex["prompt"]))
    n_resp = len(TOK.encode(ex["response"])) + 1  # + eos
    assert mask[:n_prompt].sum() == 0
    assert mask[n_prompt : n_prompt + n_resp].all() and mask.sum() == n_resp
    assert TOK.decode(tokens[mask == 1]) == " Ostrova" and tokens[mask == 1][-1] == TOK.eos_token_id
    assert (tokens[n_prompt + n_resp :] == TOK.pad_token_id).all()


def test_text_and_preference_encoding_and_truncation():
    enc = encode_example({"text": "abcdef"}, "text", TOK, seq_len=4)
    assert enc["tokens"].shape == (5,) and enc["loss_mask"].tolist() == [0, 1, 1, 1, 1]
    pair = encode_example({"prompt": "p", "chosen": "yes", "rejected": "no"}, "preference", TOK, 16)
    assert TOK.decode(pair["chosen_tokens"][pair["chosen_mask"] == 1]) == "yes"
    assert TOK.decode(pair["rejected_tokens"][pair["rejected_mask"] == 1]) == "no"
    with pytest.raises(ValueError, match="needs the field 'response'"):
        encode_example({"prompt": "x"}, "instruction", TOK, 8)


def _tagged(tag, n):
    return [{"tokens": np.full(3, tag * 1000 + i, np.int32)} for i in range(n)]


def test_batched_stream_is_deterministic_and_covers_epochs():
    data = _tagged(1, 10)
    a = batched_stream(data, batch_size=4, num_batches=5, seed=3)
    b = batched_stream(data, batch_size=4, num_batches=5, seed=3)
    assert len(a) == 5 and a[0]["tokens"].shape == (4, 3)
    assert all((a[k]["tokens"] == b[k]["tokens"]).all() for k in range(5))
    first_epoch = np.concatenate([a[k]["tokens"][:, 0] for k in range(5)])[:10]
    assert sorted(first_epoch) == [1000 + i for i in range(10)]  # each example once per epoch


def test_replay_ratio_holds_over_many_batches():
    current, pool = _tagged(1, 50), _tagged(2, 30)
    ratio, batch, batches = 0.25, 32, 400
    stream = batched_stream(
        current, batch_size=batch, num_batches=batches, seed=0, replay=pool, replay_ratio=ratio
    )
    ids = np.concatenate([stream[k]["tokens"][:, 0] for k in range(batches)])
    replayed = (ids >= 2000).mean()
    sd = np.sqrt(ratio * (1 - ratio) / ids.size)
    assert abs(replayed - ratio) < 4 * sd  # 4 sigma: 0.25 ± 0.0153
    assert set(ids[ids >= 2000]) <= {2000 + i for i in range(30)}
    assert len(set(ids[ids >= 2000])) == 30  # the whole pool gets replayed


def test_replay_mix_rejects_bad_ratio():
    import grain

    ds = grain.MapDataset.source(_tagged(1, 3))
    with pytest.raises(ValueError, match="ratio"):
        ReplayMix(ds, ds, 1.5, seed=0)


def test_eval_batches_mark_padding_rows():
    enc = encode_all(generate("cit/capitals", "eval", 10), "instruction", TOK, 32)
    batches = eval_batches(enc, 4)
    assert len(batches) == 3 and batches[-1]["valid"].tolist() == [1, 1, 0, 0]
