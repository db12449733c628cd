"""Replay as data ops: reservoir buffer, quotas, checkpoint round trip, schedules, pseudo-replay."""

import json

import numpy as np
import pytest

from jaxcl.data import (
    RatioScheduleSpec,
    ReplayBuffer,
    batched_stream,
    common_prefix,
    make_generate_fn,
    pseudo_replay,
    ratio_schedule,
)
from jaxcl.data.benchmarks import generate
from jaxcl.data.replay import allocate
from jaxcl.models.tokenizer import ByteTokenizer


def _tagged(tag, n, width=3):
    return [{"tokens": np.full(width, tag * 10_000 + i, np.int32)} for i in range(n)]


def _ids(examples):
    return sorted(int(e["tokens"][0]) for e in examples)


def test_allocate_splits_exactly_and_respects_limits():
    assert allocate(10, [1, 1, 1], [100, 100, 100]) == [4, 3, 3]
    assert allocate(10, [1, 1, 1], [2, 100, 100]) == [2, 4, 4]  # a small task's slack moves on
    assert allocate(10, [3, 1], [100, 100]) == [8, 2] or allocate(10, [3, 1], [100, 100]) == [7, 3]
    assert sum(allocate(7, [0.2, 0.5, 0.3], [5, 5, 5])) == 7
    assert allocate(10, [1, 1], [2, 3]) == [2, 3]  # not enough data: everything is kept


def test_reservoir_is_uniform_over_the_stream():
    # Each of 40 examples should be kept with probability 10/40 over many seeds.
    hits = np.zeros(40)
    for seed in range(300):
        buf = ReplayBuffer(10, seed=seed)
        buf.add_task("a", _tagged(0, 40))
        hits[_ids(buf.examples())] += 1
    rate = hits / 300
    assert abs(rate.mean() - 0.25) < 1e-9 and rate.min() > 0.14 and rate.max() < 0.36
    # Early and late examples are equally likely (no recency bias).
    assert abs(rate[:20].mean() - rate[20:].mean()) < 0.05


@pytest.mark.parametrize("quota", ["equal", "proportional"])
def test_quotas_are_met(quota):
    buf = ReplayBuffer(60, quota=quota, seed=1)
    sizes = {"a": 100, "b": 50, "c": 150}
    for t, (name, n) in enumerate(sizes.items()):
        buf.add_task(name, _tagged(t + 1, n))
    q = buf.quotas()
    assert sum(q.values()) == 60 == len(buf)
    want = {"equal": {"a": 20, "b": 20, "c": 20}, "proportional": {"a": 20, "b": 10, "c": 30}}
    assert q == want[quota]
    for t, name in enumerate(sizes):
        kept = _ids(buf.examples(name))
        assert len(kept) == q[name] and len(set(kept)) == len(kept)
        assert all(i // 10_000 == t + 1 for i in kept)  # each slot holds its own task's examples


def test_inscl_gives_dissimilar_tasks_more_replay():
    buf = ReplayBuffer(40, quota="inscl", seed=0)
    capitals = [e["prompt"] for e in generate("cit/capitals", "train", 30)]
    antonyms = [e["prompt"] for e in generate("cit/antonyms", "train", 30)]
    buf.add_task("capitals", _tagged(1, 30), instructions=capitals)
    buf.add_task("antonyms", _tagged(2, 30), instructions=antonyms)
    assert buf.quotas() == {"capitals": 20, "antonyms": 20}  # no upcoming task yet: equal
    # The upcoming task resembles capitals: antonyms (more dissimilar) gets the larger share.
    buf.set_upcoming([f"Q: capital of Land{i}?\nA:" for i in range(5)])
    q = buf.quotas()
    assert q["antonyms"] > q["capitals"] and sum(q.values()) == 40
    assert len(buf.examples("antonyms")) == q["antonyms"]
    with pytest.raises(ValueError, match="without instructions"):
        b = ReplayBuffer(4, quota="inscl")
        b.add_task("x", _tagged(1, 3))
        b.quotas()


def test_buffer_round_trips_through_an_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    buf = ReplayBuffer(12, quota="inscl", seed=3)
    buf.add_task("a", _tagged(1, 20, width=5), instructions=["sum two numbers"])
    buf.add_task("b", _tagged(2, 9, width=5), instructions=["name the capital"])
    buf.set_upcoming(["add the numbers"])
    state = buf.state()
    json.dumps(state["meta"])  # the metadata is plain JSON
    with ocp.CheckpointManager(
        tmp_path,
        item_names=("replay_arrays", "replay_meta"),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
    ) as mgr:
        mgr.save(
            7,
            args=ocp.args.Composite(
                replay_arrays=ocp.args.StandardSave(state["arrays"]),
                replay_meta=ocp.args.JsonSave(state["meta"]),
            ),
        )
        mgr.wait_until_finished()
        got = mgr.restore(
            7,
            args=ocp.args.Composite(
                replay_arrays=ocp.args.StandardRestore(), replay_meta=ocp.args.JsonRestore()
            ),
        )
    back = ReplayBuffer.from_state({"meta": got["replay_meta"], "arrays": got["replay_arrays"]})
    assert back.tasks == buf.tasks and back.seen == buf.seen and back.quotas() == buf.quotas()
    for name in buf.tasks:
        a, b = buf.examples(name), back.examples(name)
        assert len(a) == len(b) and all((x["tokens"] == y["tokens"]).all() for x, y in zip(a, b))
    # The restored buffer continues exactly as the original would.
    buf.add_task("c", _tagged(3, 15, width=5), instructions=["translate"])
    back.add_task("c", _tagged(3, 15, width=5), instructions=["translate"])
    assert _ids(buf.examples()) == _ids(back.examples())


def _replayed_share(ratio, batches=2000, batch=16):
    stream = batched_stream(
        _tagged(1, 300),
        batch_size=batch,
        num_batches=batches,
        seed=5,
        replay=_tagged(2, 40),
        replay_ratio=ratio,
    )
    share = np.array([(stream[k]["tokens"][:, 0] >= 20_000).mean() for k in range(batches)])
    return share


@pytest.mark.slow
def test_replay_share_over_2000_batches_is_within_2_points():
    share = _replayed_share(0.3)
    print(f"replayed share over 2,000 batches at ratio 0.30: {share.mean():.4f}")
    assert abs(share.mean() - 0.3) < 0.02, share.mean()
    # A schedule: 0.5 -> 0.1 linearly over the 2000 steps; compare with the declared mean.
    sched = ratio_schedule("linear", start=0.5, end=0.1, steps=2000)
    share = _replayed_share(sched)
    declared = np.mean([sched(k) for k in range(2000)])
    assert abs(share.mean() - declared) < 0.02
    assert share[:500].mean() > share[-500:].mean() + 0.2  # the ratio really follows the schedule


def test_replay_share_short_run_and_schedules():
    share = _replayed_share(0.3, batches=300)
    assert abs(share.mean() - 0.3) < 0.02
    pw = RatioScheduleSpec(kind="piecewise", boundaries=[10, 20], values=[0.0, 1.0, 0.2]).build()
    assert [pw(0), pw(9), pw(10), pw(19), pw(20), pw(500)] == [0.0, 0.0, 1.0, 1.0, 0.2, 0.2]
    cos = ratio_schedule("cosine", start=0.0, end=0.4, steps=10)
    assert cos(0) == 0.0 and abs(cos(5) - 0.2) < 1e-9 and cos(99) == pytest.approx(0.4)
    stream = batched_stream(
        _tagged(1, 50), batch_size=8, num_batches=30, seed=0, replay=_tagged(2, 5), replay_ratio=pw
    )
    firsts = [(stream[k]["tokens"][:, 0] >= 20_000).mean() for k in range(30)]
    assert firsts[:10] == [0.0] * 10 and firsts[10:20] == [1.0] * 10
    with pytest.raises(ValueError, match="ratios must lie in"):
        ratio_schedule("linear", start=0.0, end=1.5)


def test_pseudo_replay_from_a_generate_fn():
    calls = []

    def fake_generate(prompts):
        calls.append(len(prompts))
        outs = []
        for i, _ in enumerate(prompts):
            n = sum(calls) + i
            outs.append("Zembla?\nA: Ostrova" if n % 3 else "Zembla? (no answer)")
        return outs

    prompts = [e["prompt"] for e in generate("cit/capitals", "train", 20)]
    prefix = common_prefix(prompts)
    assert prefix == "Q: capital of "
    out = pseudo_replay(fake_generate, {"capitals": prefix}, per_task=10, batch_size=4)
    assert calls == [4, 4, 2]
    rows, stats = out.examples["capitals"], out.stats["capitals"]
    assert stats["generated"] == 10 and stats["kept"] + stats["dropped"] == 10
    assert stats["dropped"] >= 1 and stats["unique"] == 1
    assert rows[0] == {"prompt": "Q: capital of Zembla?\nA:", "response": " Ostrova"}
    text = pseudo_replay(lambda ps: [" more" for _ in ps], {"t": "Once"}, per_task=2, kind="text")
    assert text.all() == [{"text": "Once more"}] * 2


def test_make_generate_fn_wraps_a_generate_callable():
    tok = ByteTokenizer()

    def fake_generate(model, input_ids, max_new_tokens, temperature):
        assert input_ids.shape[0] == 1 and input_ids[0, 0] == tok.bos_token_id
        new = tok.encode(" Ostrova") + [tok.eos_token_id] + tok.encode("junk")
        return np.concatenate([input_ids, np.asarray([new[:max_new_tokens]])], axis=1)

    fn = make_generate_fn(None, tok, max_new_tokens=12, generate=fake_generate, temperature=0.7)
    assert fn(["Q: capital of Zembla?\nA:", "x"]) == [" Ostrova", " Ostrova"]
