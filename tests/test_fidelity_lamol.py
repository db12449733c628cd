"""LAMOL (Sun et al., 2020) against an independent oracle of its procedure and loss.

The reference code (chho33/LAMOL) does, at the start of task ``t > 0`` (``train.py`` calls
``create_extra_data`` with the model that just finished task ``t − 1``):
``gen_size = ceil(|T_t| · gen_lm_sample_percentage)``, less ``gen_size % t``, then
``gen_size / t`` samples from each earlier task's generation token, top-k 20 at temperature 1;
samples without an answer token are dropped (``etl_single_extra_data``), the rest are added to
task ``t``'s data, and nothing of the real earlier data is kept. Its loss is
``qa_loss + lm_lambda · lm_loss`` (``get_losses``), the answer's NLL plus λ (0.25) times the NLL
of the whole example after the generation token, each a token mean. The oracles below restate
that in plain Python and numpy; the hooks run through a fake stage context whose ``generate``
tool records what it is asked and returns scripted continuations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError

from jaxcl.data import encode_all
from jaxcl.data.pseudo import common_prefix, prompt_separator, pseudo_counts, pseudo_replay
from jaxcl.data.replay import ReplayBuffer
from jaxcl.methods.memory import ReplaySpec
from jaxcl.methods.protocol import Carry, Context, TaskInfo, run_hooks
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.objectives.terms import compose_objective, lm_term

TOK = ByteTokenizer()
SEQ = 48
TASKS = {  # name -> (prompt format, real examples)
    "capitals": [(f"Q: capital of Land{i}?\nA:", f" City{i}") for i in range(10)],
    "antonyms": [(f"Opposite of 'w{i}' ->", f" o{i}") for i in range(20)],
    "sentiment": [(f"Review: the item {i} was fine.\nSentiment:", " positive") for i in range(30)],
}


class State:
    """A stand-in for the train state: ``params`` names the model (which task it finished)."""

    def __init__(self, params):
        self.params = params


class FakeGenerate:
    """Records every call; the continuation of prefix ``p`` in call ``c``, row ``r`` is scripted:
    every 4th is malformed (no separator), the others a well-formed example."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, prompts, *, max_new_tokens, temperature, top_k, seed):
        self.calls.append(
            {"params": params, "prompts": list(prompts), "max_new_tokens": max_new_tokens,
             "temperature": temperature, "top_k": top_k, "seed": seed}
        )  # fmt: skip
        c = len(self.calls)
        out = []
        for r, p in enumerate(prompts):
            if r % 4 == 3:
                out.append(" rambling without an answer")
            elif p.startswith("Q:"):
                out.append(f"Gen{c}x{r}?\nA: Town{c}x{r}")
            elif p.startswith("Opposite"):
                out.append(f"'g{c}x{r}' -> a{c}x{r}")
            else:
                out.append(f"gen {c}x{r} was bad.\nSentiment: negative")
        return out


def _task(index, name):
    rows = [{"prompt": p, "response": r} for p, r in TASKS[name]]
    return TaskInfo(
        index, name, 5, encode_all(rows, "instruction", TOK, SEQ), [p for p, _ in TASKS[name]],
        tuple(TASKS),
    )  # fmt: skip


def _ctx(task, generate, kind="instruct"):
    tools = {
        "generate": generate,
        "tokenizer": TOK,
        "encode": lambda rows: encode_all(rows, "instruction", TOK, SEQ),
        "kind": kind,
        "seq_len": SEQ,
        "seed": 7,
    }
    unused = lambda *a: None  # noqa: E731 - the hooks need no model access
    return Context(task, unused, unused, unused, unused, unused, tools)


def _run_stage(spec, generate):
    """The protocol's order for three tasks: task_start hooks, 'training' (the params become
    the name of the finished task), memory hooks. Returns the buffer's pool after each start."""
    hooks = spec.hooks()
    carry = Carry(State("init"), {}, spec.new_memory(seed=0, n_tasks=3))
    pools = []
    for t, name in enumerate(TASKS):
        ctx = _ctx(_task(t, name), generate)
        carry = run_hooks(hooks, "task_start", ctx, carry)
        pools.append({n: carry.buffer.examples(n) for n in carry.buffer.tasks})
        carry = carry._replace(state=State(f"after {name}"))
        carry = run_hooks(hooks, "memory", ctx, carry)
    return carry, pools


def _decode(row):
    ids = [int(i) for i, m in zip(row["tokens"], row["loss_mask"]) if i != TOK.pad_token_id]
    return TOK.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- oracles


def _lamol_counts(n_new, n_prev, gamma):
    """create_extra_data: ceil(n · γ), rounded down to a multiple of the earlier tasks."""
    gen_size = int(np.ceil(n_new * gamma))
    gen_size -= gen_size % n_prev
    return [gen_size // n_prev] * n_prev


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- procedure


def test_counts_follow_lamols_split():
    for n_new, k, gamma in [(1000, 1, 0.2), (1000, 3, 0.2), (37, 2, 0.05), (10, 4, 0.2)]:
        assert pseudo_counts(n_new, k, ratio=gamma) == _lamol_counts(n_new, k, gamma)
    assert pseudo_counts(1000, 3, ratio=0.2) == [66, 66, 66]  # 200 - 200 % 3 = 198
    assert pseudo_counts(10, 3, ratio=0.2, per_task=5) == [5, 5, 5]
    # a capacity shares itself equally (the first tasks one more), never above the uncapped count
    assert pseudo_counts(1000, 3, ratio=0.2, capacity=100) == [34, 33, 33]
    assert pseudo_counts(1000, 3, ratio=0.2, capacity=10_000) == [66, 66, 66]


def test_every_task_start_regenerates_all_finished_tasks_with_the_previous_model():
    spec = ReplaySpec(name="replay", pseudo={"ratio": 0.4})
    generate = FakeGenerate()
    carry, pools = _run_stage(spec, generate)
    # no generation before the first task; at task t, one call per finished task, in task order
    by_start = [c["params"] for c in generate.calls]
    assert by_start == ["after capitals", "after antonyms", "after antonyms"]
    names = list(TASKS)
    expect_calls = []
    for t in (1, 2):
        n_new = len(TASKS[names[t]])
        for name, count in zip(names[:t], _lamol_counts(n_new, t, 0.4)):
            expect_calls.append((names[t - 1], common_prefix([p for p, _ in TASKS[name]]), count))
    got = [(c["params"][6:], c["prompts"][0], len(c["prompts"])) for c in generate.calls]
    assert got == expect_calls  # [capitals: 8] at antonyms; [capitals: 6, antonyms: 6] at sentiment
    for call in generate.calls:
        assert len(set(call["prompts"])) == 1  # a task's prompts are its prefix, repeated
        assert (call["temperature"], call["top_k"]) == (1.0, 20)  # LAMOL's sampling
        prefix_len = len(TOK.encode(call["prompts"][0]))
        assert call["max_new_tokens"] == SEQ - prefix_len - 1  # what a row leaves after bos
    assert len({c["seed"] for c in generate.calls}) == len(generate.calls)
    # the pool at task 1 holds task 0's pseudo-examples only; at task 2 both, regenerated
    assert list(pools[0]) == [] and list(pools[1]) == ["capitals"]
    assert list(pools[2]) == ["capitals", "antonyms"]
    assert len(pools[1]["capitals"]) == 6  # 8 generated, rows 3 and 7 (no separator) dropped
    assert {n: len(r) for n, r in pools[2].items()} == {"capitals": 5, "antonyms": 5}
    real = {f"{p}{r}" for rows in TASKS.values() for p, r in rows}
    texts = {n: [_decode(row) for row in rows] for n, rows in pools[2].items()}
    assert not (set(texts["capitals"]) | set(texts["antonyms"])) & real  # no real data kept
    # capitals' first pseudo-examples (call 1) were replaced by call 2's, from the newer model
    assert all(t.startswith("Q: capital of Gen2x") for t in texts["capitals"])
    assert all(t.startswith("Opposite of 'g3x") for t in texts["antonyms"])
    # the notes (saved with the buffer) say what was generated for which task
    note = carry.buffer.notes["capitals"]
    assert note["prefix"] == "Q: capital of " and note["separator"] == "\nA:"
    assert note["generated"] == {
        "generated": 6, "kept": 5, "dropped": 1, "unique": 5, "for_task": "sentiment"
    }  # fmt: skip


def test_pseudo_examples_are_encoded_like_real_instruction_rows():
    spec = ReplaySpec(name="replay", pseudo={"per_task": 3})
    _, pools = _run_stage(spec, FakeGenerate())
    row = pools[1]["capitals"][0]
    expect = encode_all(
        [{"prompt": "Q: capital of Gen1x0?\nA:", "response": " Town1x0"}], "instruction", TOK, SEQ
    )[0]
    np.testing.assert_array_equal(row["tokens"], expect["tokens"])
    np.testing.assert_array_equal(row["loss_mask"], expect["loss_mask"])  # the response trained


def test_mixing_share_is_lamols_union_unless_given():
    assert ReplaySpec(name="replay", pseudo={"ratio": 0.2}).replay_ratio() == pytest.approx(
        0.2 / 1.2
    )
    assert ReplaySpec(name="replay", ratio=0.5, pseudo={}).replay_ratio() == 0.5
    assert ReplaySpec(name="replay", pseudo={"per_task": 4}).replay_ratio() == 0.2
    assert ReplaySpec(name="replay").replay_ratio() == 0.2  # plain replay unchanged
    # no capacity given: LAMOL has no bound; a given capacity caps the generations
    assert ReplaySpec(name="replay", pseudo={}).new_memory(seed=0, n_tasks=2).capacity > 10**9
    capped = ReplaySpec(name="replay", capacity=4, pseudo={"per_task": 8})
    gen = FakeGenerate()
    _, pools = _run_stage(capped, gen)
    assert [len(c["prompts"]) for c in gen.calls] == [4, 2, 2]


def test_buffer_of_notes_only_survives_a_checkpoint_round_trip():
    spec = ReplaySpec(name="replay", pseudo={})
    carry = Carry(State("p"), {}, spec.new_memory(seed=0, n_tasks=2))
    carry = run_hooks(spec.hooks(), "memory", _ctx(_task(0, "antonyms"), None), carry)
    state = carry.buffer.state()
    assert len(carry.buffer) == 0 and state["meta"]["stored"] == 0  # meta only: nothing to save
    assert state["meta"]["notes"]["antonyms"]["separator"] == " ->"
    back = ReplayBuffer.from_state({"meta": state["meta"], "arrays": None})
    assert back.tasks == ["antonyms"] and back.notes == carry.buffer.notes
    gen = FakeGenerate()
    carry = carry._replace(buffer=back)
    run_hooks(spec.hooks(), "task_start", _ctx(_task(1, "capitals"), gen), carry)
    assert gen.calls[0]["prompts"][0] == "Opposite of "


def test_refusals_name_the_field():
    with pytest.raises(ValidationError, match="quota must be 'equal'"):
        ReplaySpec(name="replay", quota="inscl", pseudo={})
    with pytest.raises(ValidationError):
        ReplaySpec(name="replay", pseudo={"gamma": 0.2})  # strict: unknown option
    spec = ReplaySpec(name="replay", pseudo={})
    carry = Carry(State("p"), {}, spec.new_memory(seed=0, n_tasks=2))
    with pytest.raises(ValueError, match="align stage has no pseudo-replay"):
        run_hooks(spec.hooks(), "memory", _ctx(_task(0, "capitals"), None, kind="align"), carry)
    with pytest.raises(ValueError, match="separator"):
        prompt_separator(["what is 2+2?", "name a colour!"])


def test_separator_is_searched_after_the_prefix():
    # the prefix itself holds the separator ("\nA:" of a one-shot demonstration)
    prefix = "Q: demo?\nA: yes\nQ: "
    out = pseudo_replay(
        lambda ps: ["new one?\nA: no"] * len(ps), {"t": prefix}, per_task=2, separator="\nA:"
    )
    assert out.examples["t"][0] == {"prompt": prefix + "new one?\nA:", "response": " no"}


def test_text_stages_generate_whole_texts():
    spec = ReplaySpec(name="replay", pseudo={"per_task": 2})
    buf = spec.new_memory(seed=0, n_tasks=2)
    text = TaskInfo(0, "docs", 3, [], ["Once upon a time", "Once upon a hill"])
    nxt = TaskInfo(1, "more", 3, [], ["x"])
    tools = {"generate": lambda params, ps, **kw: ["there was a fox"] * len(ps),
             "tokenizer": TOK, "encode": lambda rows: encode_all(rows, "text", TOK, SEQ),
             "kind": "pretrain", "seq_len": SEQ, "seed": 0}  # fmt: skip
    unused = lambda *a: None  # noqa: E731
    carry = Carry(State("p"), {}, buf)
    carry = run_hooks(spec.hooks(), "memory", Context(text, *[unused] * 5, tools), carry)
    assert "separator" not in buf.notes["docs"]
    run_hooks(spec.hooks(), "task_start", Context(nxt, *[unused] * 5, tools), carry)
    assert [_decode(r) for r in buf.examples("docs")] == ["Once upon a there was a fox"] * 2


# ----------------------------------------------------------------------------- LM loss


def _toy_apply(params, ids):
    return jnp.tanh(params["emb"][ids] @ params["mix"]["w"] + params["b"]) @ params["emb"].T


def _toy_params():
    r = np.random.default_rng(0)
    v, d = 300, 6  # byte tokenizer ids < 259
    return {
        "emb": jnp.asarray(r.normal(size=(v, d)) * 0.5, jnp.float32),
        "mix": {"w": jnp.asarray(r.normal(size=(d, d)), jnp.float32)},
        "b": jnp.asarray(r.normal(size=(d,)), jnp.float32),
    }


ROWS = [
    {"prompt": "Q: capital of Aa?\nA:", "response": " Bb"},
    {"prompt": "Opposite of 'up' ->", "response": " down below"},
    {"prompt": "Review: ok.\nSentiment:", "response": " positive"},
]


def _np_lamol_loss(params, tokens, lam):
    """LAMOL's ``qa_loss + λ lm_loss`` in float64: the answer's (response + eos) mean NLL plus λ
    times the mean NLL of every token after the first (prompt, response, eos); the token spans
    come from the texts' lengths, not from the encoded masks."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    h = np.tanh(p["emb"][tokens[:, :-1]] @ p["mix"]["w"] + p["b"])
    logp = _np_log_softmax(h @ p["emb"].T)
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    qa_mask, lm_mask = np.zeros_like(nll), np.zeros_like(nll)
    for b, row in enumerate(ROWS):
        n_prompt, n_answer = len(TOK.encode(row["prompt"])), len(TOK.encode(row["response"])) + 1
        # target t is token t+1: the prompt's tokens are targets 0..n_prompt-1 (after bos)
        qa_mask[b, n_prompt : n_prompt + n_answer] = 1
        lm_mask[b, : n_prompt + n_answer] = 1
    qa = (nll * qa_mask).sum() / qa_mask.sum()
    lm = (nll * lm_mask).sum() / lm_mask.sum()
    return qa + lam * lm, lm, lm_mask.sum() / qa_mask.sum()


@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0])
def test_question_loss_is_lamols_qa_plus_lambda_lm(lam):
    enc = encode_all(ROWS, "instruction", TOK, 40)
    batch = {k: jnp.asarray(np.stack([e[k] for e in enc])) for k in ("tokens", "loss_mask")}
    tokens, params = np.asarray(batch["tokens"]), _toy_params()
    objective = compose_objective(_toy_apply, [lm_term(question_loss=lam)])
    (loss, metrics), grad = jax.value_and_grad(objective.loss_fn, has_aux=True)(params, batch, {})
    expect, lm, weight = _np_lamol_loss(params, tokens, lam)
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)
    assert weight > 2  # the prompts carry most tokens: the option can be told from the plain loss
    if lam:
        np.testing.assert_allclose(float(metrics["lm/example"]), lm, rtol=1e-5)
    # the gradient along a random direction against a central difference of the oracle
    r = np.random.default_rng(1)
    direction = jax.tree.map(lambda x: r.normal(size=x.shape), params)
    eps = 1e-4
    shifted = [
        jax.tree.map(lambda x, d, s=s: np.asarray(x, np.float64) + s * eps * d, params, direction)
        for s in (1, -1)
    ]
    fd = _np_lamol_loss(shifted[0], tokens, lam)[0] - _np_lamol_loss(shifted[1], tokens, lam)[0]
    along = sum(float(np.sum(np.asarray(g) * d)) for g, d in zip(jax.tree.leaves(grad),
                jax.tree.leaves(direction)))  # fmt: skip
    np.testing.assert_allclose(along, fd / (2 * eps), rtol=2e-3)


# ----------------------------------------------------------------------------- through the trainer

MICRO = """
name: lamol-micro
out_dir: {out}
seed: 0
probes: false
model: {{preset: test-micro}}
mesh: {{data: -1, fsdp: 1, tensor: 1}}
optimizer: {{lr: 3.0e-3, warmup_steps: 1, schedule: constant, weight_decay: 0.0}}
stages:
  - name: cit
    kind: instruct
    seq_len: 40
    batch_size: 8
    eval_batch_size: 16
    steps_per_task: 40
    {terms}
    tasks:
      - {{name: capitals, data: {{bundled: cit/capitals, train_size: 200, eval_size: 16}}}}
      - {{name: antonyms, data: {{bundled: cit/antonyms, train_size: 200, eval_size: 16}}}}
    methods:
      - {{name: replay, pseudo: {{ratio: 0.2, max_new_tokens: 16}}}}
"""


@pytest.mark.slow  # ~30 s of CPU: two 40-step tasks, one generation, evaluation
def test_a_recipe_trains_on_pseudo_examples_the_model_writes(tmp_path, monkeypatch):
    """The tiny model, trained on capitals with LAMOL's LM loss (λ = 0.25), writes well-formed
    capitals examples at the start of antonyms; they, and no real capitals row, are mixed in."""
    import jaxcl.methods.memory as memory
    import jaxcl.objectives.spec as objective_spec
    from jaxcl.recipe import load_recipe
    from jaxcl.train.runner import run_recipe

    if "question_loss" in objective_spec.LmTermSpec.model_fields:
        terms = "terms: [{name: lm, question_loss: 0.25}]"
    else:  # until the recipe's lm term carries the option: the same term, built directly
        terms = ""
        monkeypatch.setattr(objective_spec, "lm_term", lambda w: lm_term(w, question_loss=0.25))
    made, mixed = [], []
    real = memory.pseudo_replay

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(memory, "pseudo_replay", recording)
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO.format(out=tmp_path / "run", terms=terms))
    from jaxcl.train import stage as stage_module

    streams = stage_module.StageRun.streams

    def spy(self, t, first):
        mixed.append(self.cursor.buffer.examples())
        return streams(self, t, first)

    monkeypatch.setattr(stage_module.StageRun, "streams", spy)
    run_recipe(load_recipe(path), overwrite=True)
    (out,) = made  # one generation: at the start of antonyms, for capitals
    stats = out.stats["capitals"]
    assert stats["generated"] == 40  # ⌈0.2 · 200⌉ for one finished task
    assert stats["kept"] >= 5, stats  # the LM loss taught it the question format
    assert all(r["prompt"].startswith("Q: capital of ") and r["prompt"].endswith("\nA:")
               for r in out.examples["capitals"])  # fmt: skip
    assert mixed[0] == [] and len(mixed[1]) == stats["kept"]  # the pool: the kept pseudo rows
    real_rows = {tuple(r["tokens"]) for r in _bundled_capitals(200)}
    assert not {tuple(r["tokens"]) for r in mixed[1]} & real_rows


def _bundled_capitals(n):
    from jaxcl.data.benchmarks import generate

    return encode_all(generate("cit/capitals", "train", n), "instruction", TOK, 40)
