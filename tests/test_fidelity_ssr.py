"""SSR (Huang et al., ACL 2024) against oracles of its reference code (DeepLearnXMU/SSR).

The reference's steps, restated here in plain Python and numpy (never imported):

- ``custom/icl_gen/complete_param_nic010_cate.py``: one in-context prompt per ordered tuple of
  ``n_shots`` distinct demonstrations (``times()``), ``definition + "\\n\\n"``, then
  ``"Input: " + x + "\\n" + "Output: " + y + "\\n\\n"`` per demonstration, then ``"Input:"``;
  the **base** model samples (top-p 0.6, temperature 0.9, 3 tries) and ``parser.py`` cuts
  ``Input: … Output: …`` instances out of each continuation;
- ``custom/icl_gen/kmeans_self.py``: K-means (20 clusters) over L2-normalised embeddings of the
  synthetic inputs; cluster ``c`` keeps its ``round(200 · n_c / N)`` inputs nearest its centroid;
- ``custom/icl_gen/label_param.py`` (run in the ``*_iclgen_self`` scripts with the checkpoint of
  the task just trained): the **latest** model answers each kept input greedily;
- the training scripts replay every earlier task's kept pairs with the new task's data.

The hooks run here through a fake stage context whose ``generate`` tool tells the models apart
by their parameters, with two real ``test-micro`` models, and through the trainer (slow): the
``test-micro`` model (or ``tiny``, with ``JAXCL_SSR_PRESET=tiny``) pretrained on in-context
lists of the quickstart's instruction tasks, then trained on them with SSR, plain fine-tuning and
real replay.
"""

import os
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from jaxcl.data import encode_all
from jaxcl.data.synthetic import (
    cluster_select,
    demonstration_sets,
    hashed_embedding,
    icl_prompt,
    kmeans,
    kmeans_init,
    parse_inputs,
    random_select,
)
from jaxcl.methods.protocol import Carry, Context, TaskInfo, run_hooks
from jaxcl.methods.ssr import SsrSpec, demonstrations
from jaxcl.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SEQ = 48
TASKS = {  # name -> real examples
    "capitals": [(f"Q: capital of Land{i}?\nA:", f" City{i}") for i in range(12)],
    "antonyms": [(f"Opposite of 'w{i}' ->", f" o{i}") for i in range(12)],
    "sentiment": [(f"Review: item {i} was fine.\nSentiment:", " positive") for i in range(12)],
}

# ----------------------------------------------------------------------------- oracles


def _ref_times(n, length):
    """complete_param_nic010_cate.py's ``times``: ordered n-tuples of distinct indices."""
    if n == 1:
        return [[i] for i in range(length)]
    out = []
    for i in range(length):
        for lis in _ref_times(n - 1, length):
            if i not in lis:
                out.append([i] + lis)
    return out


def _ref_prompt(definition, demos):
    """pack_instructions' string (the reference always has a definition)."""
    instruction = definition + "\n\n"
    for x, y in demos:
        instruction += "Input: " + x + "\n" + "Output: " + y + "\n\n"
    return instruction + "Input:"


def _ref_parse(outputs):
    """parser.py: split at 'Input:', keep pieces with exactly one 'Output:', strip."""
    found = []
    for inst in outputs.split("Input:"):
        pair = inst.split("Output:")
        if len(pair) == 2 and pair[0].strip():
            found.append(pair[0].strip())
    return found


def _ref_select(emb, labels, centers, sample_memory):
    """kmeans_self.py's selection, given the clustering."""
    n_cluster = len(centers)
    dist = np.array([np.linalg.norm(e - centers[labels[i]]) for i, e in enumerate(emb)])
    n_cluster_instances = [0] * n_cluster
    uniq_idx, uniq_cnt = np.unique(labels, return_counts=True)
    for i, idx in enumerate(uniq_idx):
        n_cluster_instances[idx] = uniq_cnt[i]
    clu_sample_num = [round(sample_memory * n / len(emb)) for n in n_cluster_instances]
    picked = []
    for clu_idx in range(n_cluster):
        members = np.where(labels == clu_idx)[0]
        for j in np.argsort(dist[members])[: clu_sample_num[clu_idx]]:
            picked.append(int(members[j]))
    return picked


# ----------------------------------------------------------------------------- steps


def test_the_prompt_is_the_references_format():
    demos = [("Q: capital of Land1?\nA:", " City1"), ("Q: capital of Land2?\nA:", " City2")]
    by_hand = (
        "Name the capital.\n\n"
        "Input: Q: capital of Land1?\nA:\nOutput:  City1\n\n"
        "Input: Q: capital of Land2?\nA:\nOutput:  City2\n\n"
        "Input:"
    )
    assert icl_prompt(demos, definition="Name the capital.") == by_hand
    assert by_hand == _ref_prompt("Name the capital.", demos)
    assert icl_prompt(demos) == by_hand.split("\n\n", 1)[1]  # no definition: no heading


def test_demonstration_tuples_are_the_references_ordered_ones():
    assert demonstration_sets(20, 2) == [tuple(t) for t in _ref_times(2, 20)]  # 380 pairs
    assert len(demonstration_sets(20, 2)) == 380
    assert demonstration_sets(6, 3) == [tuple(t) for t in _ref_times(3, 6)]
    some = demonstration_sets(20, 2, limit=25, seed=3)
    every = demonstration_sets(20, 2)
    assert len(set(some)) == 25 and set(some) <= set(every)
    assert some == sorted(some, key=every.index)  # still in the reference's order
    assert some == demonstration_sets(20, 2, limit=25, seed=3)  # seeded
    assert some != demonstration_sets(20, 2, limit=25, seed=4)
    assert demonstration_sets(1, 2) == []  # too few demonstrations for a prompt


def test_parsing_keeps_the_instances_the_base_model_completed():
    text = (
        " Q: capital of Land7?\nA:\nOutput:  City7\n\n"  # the open slot, completed
        "Input: Q: capital of Land8?\nA:\nOutput:  City8\n\n"  # one more instance
        "Input:  \nOutput:  x\n\n"  # a blank input
        "Input: Q: capital of Land9?"  # cut off before its output marker
    )
    assert parse_inputs(text) == ["Q: capital of Land7?\nA:", "Q: capital of Land8?\nA:"]
    assert parse_inputs(text) == _ref_parse(text)  # agrees with parser.py on plain inputs
    # a piece that rambles on with two outputs is dropped, as parser.py drops it
    twice = " Q: a?\nA:\nOutput:  b\nOutput:  c"
    assert parse_inputs(twice) == _ref_parse(twice) == []
    # inputs that hold the output marker themselves (SuperNI's prompts): cut at the last one
    nested = " Definition: d\nInput: foo\nOutput:\nOutput:  bar\n\nInput: Definition: d\nInput"
    assert parse_inputs(nested, nested=1) == ["Definition: d\nInput: foo\nOutput:"]
    # the format's own space and newline are removed, a prompt's own whitespace kept
    assert parse_inputs("   indented ->\n\nOutput:  y") == ["  indented ->\n"]


def test_selection_is_the_references_kmeans_rule_by_hand():
    # three groups on the unit circle of 6, 3 and 1 points; keep 5: round(3.0), round(1.5),
    # round(0.5) = 3, 2, 0 (half to even), the nearest to each centroid first
    ang = np.array([0.0, 0.01, -0.01, 0.02, -0.02, 0.04, 2.0, 2.02, 1.97, 4.0])
    emb = np.stack([np.cos(ang), np.sin(ang)], 1) * np.arange(1, 11)[:, None]  # norms vary
    picked = cluster_select(emb, 5, 3, seed=0)
    groups = [set(range(6)), {6, 7, 8}, {9}]
    assert [sum(i in g for i in picked) for g in groups] == [3, 2, 0]
    # group A's centroid lies at angle ≈ 0.04 / 6 = 0.0067: nearest 0.01, 0.0, 0.02 (at 0.0033,
    # 0.0067, 0.0133; -0.01 is at 0.0167); group B's at ≈ 1.9967: 2.0, then 2.02 (0.0233)
    assert [i for i in picked if i in groups[0]] == [1, 0, 3]
    assert [i for i in picked if i in groups[1]] == [6, 7]
    assert cluster_select(emb, 20, 3) == list(range(10))  # N <= keep: all kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_matches_sklearn_kmeans_and_the_references_rule(seed):
    from sklearn.cluster import KMeans  # the reference's clustering (test-only dependency)

    rng = np.random.default_rng(seed)
    emb = np.concatenate([rng.normal(c, 0.6, size=(n, 8)) for c, n in [(0, 40), (2, 25), (-2, 9)]])
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # the reference normalises first
    k, keep = 6, 30
    init = kmeans_init(x, k, seed=seed)
    centers, labels = kmeans(x, k, init=init)
    ref = KMeans(n_clusters=k, init=init, n_init=1, tol=0.0, max_iter=300).fit(x)
    np.testing.assert_array_equal(labels, ref.labels_)
    np.testing.assert_allclose(centers, ref.cluster_centers_, atol=1e-12)
    expect = _ref_select(x, ref.labels_, ref.cluster_centers_, keep)
    assert cluster_select(emb, keep, k, seed=seed) == expect
    assert abs(len(expect) - keep) <= k // 2  # per-cluster rounding, as the reference


def test_random_selection_is_a_seeded_uniform_subset():
    assert random_select(10, 20) == list(range(10))
    got = random_select(100, 30, seed=5)
    assert len(set(got)) == 30 and got == sorted(got) and got == random_select(100, 30, seed=5)
    hits = np.zeros(50)
    for s in range(400):
        hits[random_select(50, 10, seed=s)] += 1
    # each row drawn in about 10/50 of the 400 draws: Pearson's χ² (49 degrees of freedom)
    chi2 = ((hits - 80) ** 2 / 80).sum()
    assert chi2 < 85.4, chi2  # the χ²₄₉ 99.9% quantile


# ----------------------------------------------------------------------------- the hooks


class State:
    def __init__(self, params):
        self.params = params


def _who(params):
    return int(np.asarray(params["w"]))  # 0: the base model; t + 1: after task t


class FakeGenerate:
    """The stage's ``generate`` tool for two kinds of model, told apart by their parameters: the
    base model continues an in-context prompt with two new instances of its task's format (and a
    cut-off third); a trained model answers an input with a marked response."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, prompts, *, max_new_tokens, temperature=1.0, top_k=0,
                 top_p=1.0, seed=0, max_prompt_tokens=None):  # fmt: skip
        who = _who(params)
        self.calls.append({"who": who, "prompts": list(prompts), "temperature": temperature,
                           "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens,
                           "max_prompt_tokens": max_prompt_tokens})  # fmt: skip
        if who:
            return [f" ans{who}:{p[:6]}" for p in prompts]
        out = []
        for r, p in enumerate(prompts):
            first = p.split("\n\n")[0].removeprefix("Input: ").split("\n")[0][:12]
            out.append(
                f" {first} base{len(self.calls)}x{r}a\nOutput:  junk\n\n"
                f"Input: {first} base{len(self.calls)}x{r}b\nOutput:  junk\n\n"
                "Input: cut off"
            )
        return out


def _task(index, name):
    rows = [{"prompt": p, "response": r} for p, r in TASKS[name]]
    examples = encode_all(rows, "instruction", TOK, SEQ)
    return TaskInfo(index, name, 5, examples, [p for p, _ in TASKS[name]], tuple(TASKS))


def _ctx(task, generate, kind="instruct"):
    tools = {
        "generate": generate,
        "tokenizer": TOK,
        "encode": lambda rows: encode_all(rows, "instruction", TOK, SEQ),
        "kind": kind,
        "seq_len": SEQ,
        "seed": 7,
        "model_config": SimpleNamespace(max_position_embeddings=256),
    }
    unused = lambda *a: None  # noqa: E731 - the hooks need no model access
    return Context(task, unused, unused, unused, unused, unused, tools)


def _run_stage(spec, generate, made):
    """The protocol's order over three tasks: task_start hooks, 'training' (the parameters
    become ``t + 1``), memory hooks. Returns the memory's pool at each task start."""
    import jaxcl.methods.ssr as ssr

    real = ssr.synthesize

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    hooks = spec.hooks()
    carry = Carry(State({"w": np.zeros(())}), {}, spec.new_memory(seed=0, n_tasks=3))
    pools = []
    ssr.synthesize = recording
    try:
        for t, name in enumerate(TASKS):
            ctx = _ctx(_task(t, name), generate)
            carry = run_hooks(hooks, "task_start", ctx, carry)
            pools.append({n: carry.buffer.examples(n) for n in carry.buffer.tasks})
            carry = carry._replace(state=State({"w": np.full((), t + 1.0)}))
            carry = run_hooks(hooks, "memory", ctx, carry)
    finally:
        ssr.synthesize = real
    return carry, pools


def test_the_base_model_writes_inputs_and_the_latest_model_writes_outputs():
    spec = SsrSpec(name="ssr", pool=4, samples=2, keep=6, clusters=3)
    generate, made = FakeGenerate(), []
    carry, pools = _run_stage(spec, generate, made)
    assert [c["who"] for c in generate.calls] == [0, 1, 0, 2]  # sentiment (last) synthesizes none
    assert "stage_start" in carry.frozen and _who(carry.frozen["stage_start"]) == 0
    names = list(TASKS)
    for t, (icl, answer) in enumerate(zip(generate.calls[::2], generate.calls[1::2])):
        # the in-context prompts: every ordered pair of the task's first 4 rows, 2 samples each
        demos = TASKS[names[t]][:4]
        expect = [_ref_prompt("", [demos[i] for i in s])[2:] for s in _ref_times(2, 4)]
        assert icl["prompts"] == [p for p in expect for _ in range(2)]
        assert (icl["temperature"], icl["top_p"]) == (0.9, 0.6)  # the reference's sampling
        assert icl["max_new_tokens"] == SEQ + len(TOK.encode("Input: \nOutput: \n\n"))
        assert icl["max_prompt_tokens"] == 256 - icl["max_new_tokens"]
        # the latest model answers, greedily, exactly the inputs selected from the base's
        syn = made[t]
        assert syn.continuations and all("base" in x for x in syn.inputs)
        assert len(syn.inputs) == 12 * 2 * 2  # 12 prompts × 2 samples × 2 complete instances
        assert answer["prompts"] == [syn.inputs[i] for i in syn.selected]
        assert answer["temperature"] == 0.0
        assert syn.selected == cluster_select(
            hashed_embedding(syn.inputs), 6, 3, seed=_select_seed(t)
        )
        # the memory holds (base's input, latest's output), encoded like a real row
        rows = [{"prompt": x, "response": f" ans{t + 1}:{x[:6]}"} for x in answer["prompts"]]
        got = carry.buffer.examples(names[t])
        expect_rows = encode_all(rows, "instruction", TOK, SEQ)
        assert len(got) == len(expect_rows) == len(syn.selected)
        for a, b in zip(got, expect_rows):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
            np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
    # the pool at each task start: nothing, then capitals', then capitals' and antonyms'
    assert [list(p) for p in pools] == [[], ["capitals"], ["capitals", "antonyms"]]
    real = {tuple(r["tokens"]) for n in TASKS for r in _task(0, n).examples}
    assert not {tuple(r["tokens"]) for r in carry.buffer.examples()} & real  # no real row kept
    assert carry.buffer.notes["capitals"]["ssr"]["kept"] == len(made[0].selected)
    assert carry.buffer.notes["sentiment"]["ssr"] == {"skipped": "the stage's last task"}


def _select_seed(t):
    from jaxcl.methods.ssr import _seed

    return _seed(7, t, "select")


def test_demonstrations_decode_the_tasks_rows():
    ctx = _ctx(_task(0, "capitals"), None)
    assert demonstrations(ctx, 3) == TASKS["capitals"][:3]


def test_real_models_base_continues_prompts_latest_answers():
    """With two different test-micro models, the writers are exactly each one's greedy
    ``jaxcl.generate`` continuation."""
    import jaxcl
    from jaxcl.models.spec import ModelSpec
    from jaxcl.train.stage import _generate_tool

    spec_model = ModelSpec(preset="test-micro")
    graphdef, base, _, _ = spec_model.build(0)
    _, latest, _, _ = spec_model.build(1)
    stage = SimpleNamespace(eval_batch_size=4, seq_len=SEQ)
    tool = _generate_tool(SimpleNamespace(graphdef=graphdef, tokenizer=TOK), stage)
    ctx = _ctx(_task(0, "capitals"), tool)
    carry = Carry(State(latest), {"stage_start": base}, None)
    w = SsrSpec(name="ssr", temperature=0.0).writers(ctx, carry)

    def greedy(params, text, n):
        from flax import nnx

        model = nnx.merge(graphdef, params)
        ids = [TOK.bos_token_id, *TOK.encode(text)]
        out = np.asarray(jaxcl.generate(model, [ids], max_new_tokens=n))[0].tolist()
        stops = {*model.config.stop_token_ids, TOK.eos_token_id}
        out = out[: next((k for k, t in enumerate(out) if t in stops), len(out))]
        return TOK.decode([i for i in out if i < TOK.vocab_size])

    prompt = icl_prompt(TASKS["capitals"][:2])
    width = SEQ + len(TOK.encode("Input: \nOutput: \n\n"))
    assert w.write_inputs([prompt]) == [greedy(base, prompt, width)]
    x = "Q: capital of Land3?\nA:"
    n_out = SEQ - 1 - len(TOK.encode(x)) - 1
    assert w.write_outputs([x]) == [greedy(latest, x, n_out)]
    assert greedy(latest, x, n_out) != greedy(base, x, n_out)  # the two models differ
    # sampling (the default 0.9 / 0.6) is seeded: the same texts twice
    w = SsrSpec(name="ssr").writers(ctx, carry)
    assert w.write_inputs([prompt] * 3) == w.write_inputs([prompt] * 3)
    assert w.prompt_fits(prompt) and not w.input_fits("x" * SEQ)


def test_options_and_refusals():
    assert SsrSpec(name="ssr").replay_ratio() == 0.2
    ramp = SsrSpec(name="ssr", schedule={"kind": "linear", "start": 0.5, "end": 0.1, "steps": 4})
    assert ramp.replay_ratio()(4) == pytest.approx(0.1)
    assert SsrSpec(name="ssr").new_memory(seed=0, n_tasks=3).capacity > 10**9  # keep each task's
    assert SsrSpec(name="ssr", capacity=64).new_memory(seed=0, n_tasks=3).capacity == 64
    with pytest.raises(ValidationError):
        SsrSpec(name="ssr", clusers=3)  # strict: a misspelt option is refused
    spec = SsrSpec(name="ssr")
    carry = Carry(State({"w": np.zeros(())}), {}, spec.new_memory(seed=0, n_tasks=2))
    with pytest.raises(ValueError, match="ssr: a stage of kind 'align'"):
        run_hooks(spec.hooks(), "task_start", _ctx(_task(0, "capitals"), None, "align"), carry)
    from jaxcl.recipe import RecipeError, validate

    tasks = [{"name": n, "data": {"bundled": f"cit/{n}"}} for n in ("capitals", "antonyms")]
    stage = {"name": "s", "kind": "instruct", "seq_len": 48, "batch_size": 8,
             "steps_per_task": 2, "tasks": tasks}  # fmt: skip
    raw = {"name": "r", "out_dir": "unused", "stages": [stage]}
    stage["methods"] = [{"name": "ssr", "keep": 50}]
    assert validate(raw).stages[0].methods[0].keep == 50
    stage["methods"] = [{"name": "ssr"}, {"name": "replay"}]
    with pytest.raises(RecipeError, match="each keep a memory"):
        validate(raw)
    stage["methods"] = [{"name": "ssr"}]
    stage["kind"] = "pretrain"  # refused when the recipe loads, not at the first task
    stage["tasks"] = [{"name": n, "data": {"bundled": f"cpt/{n}"}} for n in ("recipes", "starlog")]
    with pytest.raises(RecipeError, match=r"methods\[0\] \(ssr\): serves stages of kind instruct"):
        validate(raw)


def test_notes_survive_a_checkpoint_round_trip():
    from jaxcl.data.replay import ReplayBuffer

    spec = SsrSpec(name="ssr", pool=3, samples=1, keep=4, clusters=2)
    carry, _ = _run_stage(spec, FakeGenerate(), [])
    state = carry.buffer.state()
    back = ReplayBuffer.from_state(state)
    assert back.notes == carry.buffer.notes and back.tasks == carry.buffer.tasks
    assert [len(back.examples(n)) for n in back.tasks] == [4, 4, 0]


# ----------------------------------------------------------------------------- through the trainer

CIT = ("sentiment", "capitals", "antonyms")  # the quickstart's instruction tasks
#: test-micro by default (about 2 minutes); JAXCL_SSR_PRESET=tiny JAXCL_SSR_ICL_STEPS=300 runs
#: the comparison on the tiny model (about 10 minutes on two CPU cores)
PRESET = os.environ.get("JAXCL_SSR_PRESET", "test-micro")
ICL_STEPS = int(os.environ.get("JAXCL_SSR_ICL_STEPS", 300))
CIT_STEPS, RATIO, KEEP = 40, 0.25, 24
SSR = {"name": "ssr", "ratio": RATIO, "pool": 8, "prompts": 32, "samples": 2, "keep": KEEP,
       "clusters": 8}  # fmt: skip


def _icl_documents(n, seed):
    """Pretraining text in the reference's in-context format: three instances of one task per
    document. The base model learns from it to continue ``Input: … Output: …`` lists, a
    stand-in for the in-context learning a pretrained LLM brings."""
    import random

    from jaxcl.data.benchmarks import generate

    rng = random.Random(seed)
    pools = {t: generate(f"cit/{t}", "train", 300, seed=seed) for t in CIT}
    docs = []
    for _ in range(n):
        rows = rng.sample(pools[rng.choice(CIT)], 3)
        docs.append({"text": "".join(f"Input: {r['prompt']}\nOutput: {r['response']}\n\n"
                                     for r in rows)})  # fmt: skip
    return docs


def _recipe(name, out, stage):
    return {
        "name": name, "out_dir": str(out), "seed": 0, "probes": False,
        "model": {"preset": PRESET}, "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "optimizer": {"lr": 3e-3, "warmup_steps": 10, "schedule": "constant",
                      "weight_decay": 0.0},
        "stages": [stage],
    }  # fmt: skip


def _cit(methods):
    return {"name": "cit", "kind": "instruct", "seq_len": SEQ, "batch_size": 16,
            "eval_batch_size": 48, "steps_per_task": CIT_STEPS, "methods": methods,
            "tasks": [{"name": t, "data": {"bundled": f"cit/{t}", "train_size": 1000,
                                           "eval_size": 48}} for t in CIT]}  # fmt: skip


@pytest.mark.slow  # ~80 s on 2 CPU cores: an in-context pretraining, then three runs of 3 tasks
def test_ssr_rehearses_synthetic_pairs_and_forgets_less_than_plain_fine_tuning(
    tmp_path, monkeypatch
):
    """test-micro, pretrained on in-context lists of the three tasks (its base), then trained on
    sentiment, capitals and antonyms (exact match) with SSR, with nothing, and with real replay
    of as many examples. SSR's synthetic pairs fill the memory and make up ``ratio`` of the
    later tasks' batches; its BWT beats plain fine-tuning's."""
    import jaxcl.methods.ssr as ssr
    import jaxcl.train.runner as runner
    from jaxcl import checkpoint
    from jaxcl.recipe import validate
    from jaxcl.train import stage as stage_module
    from jaxcl.train.runner import run_recipe

    icl = {"name": "icl", "kind": "pretrain", "seq_len": 128, "batch_size": 16,
           "steps_per_task": ICL_STEPS,
           "tasks": [{"name": "icl", "data": {"train_size": 2000, "eval_size": 32, "source": {
               "type": "memory", "kind": "text", "train": _icl_documents(2000, 5),
               "eval": _icl_documents(32, 6)}}}]}  # fmt: skip
    run_recipe(validate(_recipe("icl", tmp_path / "icl", icl)), overwrite=True)
    stage_dir = tmp_path / "icl" / "checkpoints" / "icl"
    make_context = runner.make_context

    def from_base(recipe, console):  # every run below starts from the pretrained base
        ctx, params = make_context(recipe, console)
        return ctx, checkpoint.restore_params(stage_dir, checkpoint.abstract(params))

    monkeypatch.setattr(runner, "make_context", from_base)
    made, pools, batches = [], [], []
    real_synthesize, streams = ssr.synthesize, stage_module.StageRun.streams

    def recording(*args, **kwargs):
        made.append(real_synthesize(*args, **kwargs))
        return made[-1]

    def spy(self, t, first):
        pools.append(list(self.cursor.buffer.examples()) if self.cursor.buffer else [])
        stream, memory = streams(self, t, first)
        draw = stream.next_batch

        def next_batch():
            batch = draw()
            batches.append((t, np.array(batch["tokens"])))
            return batch

        stream.next_batch = next_batch
        return stream, memory

    monkeypatch.setattr(ssr, "synthesize", recording)
    monkeypatch.setattr(stage_module.StageRun, "streams", spy)
    runs = {}
    for name, methods in [
        ("ssr", [SSR]),
        ("plain", []),
        ("replay", [{"name": "replay", "ratio": RATIO, "capacity": 2 * KEEP}]),
    ]:
        out = run_recipe(validate(_recipe(name, tmp_path / name, _cit(methods))))
        runs[name] = out["stages"][0]
        if name == "ssr":
            ssr_pools, ssr_batches = list(pools), list(batches)
    for name, r in runs.items():  # the figures docs/methods.md records (pytest -s shows them)
        metrics = {k: round(v, 3) for k, v in r["metrics"].items() if v is not None}
        print(PRESET, name, "R =", np.round(r["R"], 3).tolist(), metrics)
    print("synthesized:", [m.stats for m in made])
    # the memory: the kept synthetic pairs of every finished task
    assert len(made) == 2  # sentiment and capitals; antonyms (the last) synthesizes nothing
    encode = lambda rows: encode_all(rows, "instruction", TOK, SEQ)  # noqa: E731
    rows = [[tuple(r["tokens"]) for r in encode(m.examples)] for m in made]
    assert [len(p) for p in ssr_pools] == [0, len(rows[0]), len(rows[0]) + len(rows[1])]
    assert [tuple(r["tokens"]) for r in ssr_pools[2]] == rows[0] + rows[1]
    assert all(m.stats["kept"] >= 10 for m in made), [m.stats for m in made]
    # ... and they reach the later tasks' batches, about RATIO of each
    for t in (1, 2):
        drawn = [tuple(row) for k, b in ssr_batches if k == t for row in b]
        share = sum(r in set(sum(rows[:t], [])) for r in drawn) / len(drawn)
        assert abs(share - RATIO) < 0.08, share
    # forgetting: SSR's BWT beats plain fine-tuning's by a margin; each task was learnt first
    bwt = {name: r["metrics"]["bwt"] for name, r in runs.items()}
    for r in runs.values():
        assert min(r["R"][i][i] for i in range(3)) >= 0.6, r["R"]
    assert bwt["plain"] < -0.8  # plain fine-tuning forgets nearly everything
    assert bwt["ssr"] > bwt["plain"] + 0.25, bwt
