"""The lm-evaluation-harness adapter (``--model jaxcl``) against lm-eval's own ``hf`` backend.

One tiny random jaxcl model (the test-micro preset) is saved as an HF folder with a byte-level
transformers tokenizer that encodes exactly as jaxcl's ByteTokenizer (bos first), so lm-eval's
``hf`` backend runs the same weights in transformers + torch. Three local tasks (YAML + JSONL in
tmp, built from jaxcl's bundled generators; nothing downloads) are scored by both backends:
multiple choice (per-request log-likelihoods within 1e-4, equal accuracy), rolling
log-likelihood (per-document sums, several windows per document) and generation until a stop
string (equal strings). The command line (``python -m jaxcl.eval.harness``) runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (the optional extra: pip install -e '.[lm-eval]')"
)
pytest.importorskip("torch", reason="torch is the hf backend's oracle (the test extra)")
pytest.importorskip("accelerate", reason="lm-eval's hf backend imports accelerate")

import lm_eval  # noqa: E402

from jaxcl.data.benchmarks import generate  # noqa: E402
from jaxcl.eval import harness_run  # noqa: E402
from jaxcl.eval.harness import JaxclLM, ModelArgsError  # noqa: E402
from jaxcl.eval.harness_run import run_lm_eval  # noqa: E402
from jaxcl.eval.lm_eval_tasks import (  # noqa: E402
    BUNDLED_TASKS,
    instruction_task_docs,
    write_multiple_choice_task,
)
from jaxcl.models import from_pretrained, save_pretrained  # noqa: E402
from jaxcl.models.tokenizer import ByteTokenizer  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ROOT = Path(__file__).resolve().parent.parent
LL_TOL = 1e-4  # per-request log-likelihoods, jaxcl against transformers (both float32)


def hf_byte_tokenizer():
    """A transformers tokenizer with jaxcl's ByteTokenizer ids: 0 pad, 1 bos, 2 eos, byte b ->
    b + 3, bos added as the special token (as Llama tokenizers add theirs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):  # GPT-2's byte -> unicode map
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chars[b]: b + 3 for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def task_yaml(name: str, data: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\ntest_split: test\n{body}"
    )


def make_tasks(folder: Path) -> None:
    """``tiny_mc`` (capitals and antonyms, four choices; sentiment, two), ``tiny_text``
    (documents of several sentences: rolling windows) and ``tiny_gen`` (capitals, generated to
    a newline)."""
    folder.mkdir()
    write_multiple_choice_task(folder, "tiny_mc", instruction_task_docs(16, 8, 8))
    sentences = generate("cpt/recipes", "eval", 6) + generate("cpt/starlog", "eval", 6)
    docs = [{"text": " ".join(s["text"] for s in sentences[i : i + 2])} for i in range(0, 12, 2)]
    write_jsonl(folder / "text.jsonl", docs)
    (folder / "tiny_text.yaml").write_text(
        task_yaml(
            "tiny_text",
            folder / "text.jsonl",
            "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
            "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n",
        )
    )
    capitals = generate("cit/capitals", "eval", 10)
    gen = [{"prompt": ex["prompt"], "answer": ex["response"]} for ex in capitals]
    write_jsonl(folder / "gen.jsonl", gen)
    (folder / "tiny_gen.yaml").write_text(
        task_yaml(
            "tiny_gen",
            folder / "gen.jsonl",
            "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
            'generation_kwargs:\n  until: ["\\n", "Q:"]\n  max_gen_toks: 12\n  do_sample: false\n'
            "metric_list:\n  - metric: exact_match\n",
        )
    )


def trained_micro_model(steps: int = 60):
    """The test-micro preset after a few hundred steps on the bundled capitals, sentiment and
    text data (bos + text + eos rows), so that greedy continuations, stop strings and the
    choices' log-likelihoods mean something."""
    import jax
    import optax
    from flax import nnx

    from jaxcl.objectives import causal_lm_loss

    examples = generate("cit/capitals", "train", 256) + generate("cit/sentiment", "train", 128)
    texts = [f"{ex['prompt']}{ex['response']}\n" for ex in examples]
    texts += [ex["text"] for ex in generate("cpt/recipes", "train", 64)]
    texts += [ex["text"] for ex in generate("cpt/starlog", "train", 64)]
    tok, width = ByteTokenizer(), 97
    rows = np.zeros((len(texts), width), np.int32)
    mask = np.zeros((len(texts), width), np.float32)
    for i, text in enumerate(texts):
        ids = [*tok.encode(text, add_bos=True), tok.eos_token_id][:width]
        rows[i, : len(ids)], mask[i, 1 : len(ids)] = ids, 1.0
    model = from_pretrained("test-micro", seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, batch, batch_mask):
        def loss(p):
            logits = nnx.merge(graphdef, p)(batch[:, :-1])
            return causal_lm_loss(logits, batch[:, 1:], batch_mask[:, 1:])

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state, rng = tx.init(params), np.random.default_rng(0)
    for _ in range(steps):
        pick = rng.choice(len(texts), 32, replace=False)
        params, opt_state = step(params, opt_state, rows[pick], mask[pick])
    return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(the jaxcl model, its HF folder, the task folder, the task manager of that folder)."""
    saved = {key: os.environ.get(key) for key in OFFLINE}
    os.environ.update(OFFLINE)
    tmp = tmp_path_factory.mktemp("lm_eval")
    model = trained_micro_model()
    folder = save_pretrained(model, tmp / "hf", tokenizer=hf_byte_tokenizer())
    make_tasks(tmp / "tasks")
    manager = harness_run.task_manager(tmp / "tasks", include_defaults=False)
    yield model, folder, tmp / "tasks", manager
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def evaluate(setup, model: str, model_args: dict, task: str) -> dict:
    _, _, _, manager = setup
    with harness_run.offline():
        return lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=[task],
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=0,
        )


def hf_args(setup, **extra) -> dict:
    return {"pretrained": str(setup[1]), "device": "cpu", "dtype": "float32", **extra}


def responses(result: dict, task: str) -> list:
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"] for s in samples]


@pytest.fixture(scope="module")
def mc(setup):
    """tiny_mc through both backends: (jaxcl result, hf result)."""
    ours = evaluate(setup, "jaxcl", {"hf": str(setup[1]), "batch_size": 4}, "tiny_mc")
    theirs = evaluate(setup, "hf", hf_args(setup, batch_size=4), "tiny_mc")
    return ours, theirs


def test_multiple_choice_loglikelihoods_match_the_hf_backend(mc):
    ours, theirs = mc
    a, b = responses(ours, "tiny_mc"), responses(theirs, "tiny_mc")
    assert len(a) == len(b) == 32
    lls_a = np.array([r[0][0] for doc in a for r in doc], np.float64)
    lls_b = np.array([r[0][0] for doc in b for r in doc], np.float64)
    assert len(lls_a) == 16 * 4 + 8 * 4 + 8 * 2
    assert np.abs(lls_a - lls_b).max() <= LL_TOL, np.abs(lls_a - lls_b).max()
    greedy = [r[0][1] for doc in a for r in doc]
    assert greedy == [r[0][1] for doc in b for r in doc]
    assert any(greedy) and not all(greedy)  # both outcomes of is_greedy occur
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric]
    assert 0.5 < ours["results"]["tiny_mc"]["acc,none"] < 1.0  # trained, but not on antonyms


def test_run_lm_eval_on_params_and_byte_tokenizer(mc, setup):
    """The trainer's entry: a parameter tree, its config, jaxcl's ByteTokenizer (no HF files)."""
    from flax import nnx

    model = setup[0]
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    table = run_lm_eval(
        params,
        model.config,
        ByteTokenizer(),
        ["tiny_mc"],
        include_path=str(setup[2]),
        include_defaults=False,
        batch_size=3,
    )
    theirs = mc[1]["results"]["tiny_mc"]
    assert set(table) == {"tiny_mc"}
    assert table["tiny_mc"]["acc"] == theirs["acc,none"]
    assert table["tiny_mc"]["acc_norm"] == theirs["acc_norm,none"]
    limited = run_lm_eval(
        params, model.config, ByteTokenizer(), ["tiny_mc"], limit=5,
        include_path=str(setup[2]), include_defaults=False,
    )  # fmt: skip
    assert limited["tiny_mc"]["acc"] in {k / 5 for k in range(6)}
    with pytest.raises(ValueError, match="unknown lm-eval tasks"):
        run_lm_eval(params, model.config, ByteTokenizer(), ["nope"], include_defaults=False)


def test_rolling_loglikelihood_matches_the_hf_backend(setup):
    """max_length 64 on byte tokens: every document spans several rolling windows."""
    ours = evaluate(setup, "jaxcl", {"hf": str(setup[1]), "max_length": 64}, "tiny_text")
    theirs = evaluate(setup, "hf", hf_args(setup, max_length=64, batch_size=4), "tiny_text")
    a = np.array([r[0] for r in responses(ours, "tiny_text")], np.float64).ravel()
    b = np.array([r[0] for r in responses(theirs, "tiny_text")], np.float64).ravel()
    assert len(a) == len(b) == 6
    ours_docs = sorted(ours["samples"]["tiny_text"], key=lambda d: d["doc_id"])
    windows = np.array([-(-(len(d["doc"]["text"]) + 1) // 64) for d in ours_docs])
    assert windows.min() >= 3  # several rolling windows per document
    # per window 1e-4: the hf backend sums each window's log-probs in float32
    assert (np.abs(a - b) <= LL_TOL * windows).all(), (np.abs(a - b), windows)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        x, y = ours["results"]["tiny_text"][metric], theirs["results"]["tiny_text"][metric]
        assert abs(x - y) <= 1e-5 * abs(y), (metric, x, y)


def test_generate_until_matches_greedy_transformers(setup):
    """Greedy generation to a stop string: jaxcl's KV-cache loop against transformers'
    generate (lm-eval's hf backend), string for string."""
    ours = evaluate(setup, "jaxcl", {"hf": str(setup[1]), "batch_size": 4}, "tiny_gen")
    theirs = evaluate(setup, "hf", hf_args(setup, batch_size=4), "tiny_gen")
    a, b = responses(ours, "tiny_gen"), responses(theirs, "tiny_gen")
    assert len(a) == 10 and a == b
    texts = [r[0][0] for r in a]
    assert all("\n" not in t and "Q:" not in t for t in texts)
    assert all(t.startswith(" ") and len(t) < 12 for t in texts), texts  # cut at the newline
    assert (
        ours["results"]["tiny_gen"]["exact_match,none"]
        == (theirs["results"]["tiny_gen"]["exact_match,none"])
    )


def test_long_requests_are_cut_from_the_left_as_the_hf_backend_cuts_them(setup):
    """max_length 16: contexts (and an over-long continuation's head) lose tokens from the left;
    an empty context is the prefix token."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    ours = JaxclLM(hf=str(setup[1]), max_length=16, batch_size=2)
    theirs = HFLM(pretrained=str(setup[1]), device="cpu", dtype="float32", max_length=16)
    pairs = [
        ("Q: capital of Borduria?\nA:", " Szohod"),
        ("Review: the film was dull.\nSentiment:", " negative"),
        ("", "To make soup"),
        ("x", " a continuation of exactly sixteen"[:16]),
        ("Stardate 1234.5: the", " ship entered"),
    ]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    a, b = ours.loglikelihood(reqs), theirs.loglikelihood(reqs)
    assert np.abs(np.array([x[0] for x in a]) - [x[0] for x in b]).max() <= LL_TOL
    assert [x[1] for x in a] == [x[1] for x in b]
    assert ours.tok_encode("Q: capital") == theirs.tok_encode("Q: capital")


def test_generate_until_stops_at_the_until_string(setup):
    """A stop string is cut off and nothing after it is kept."""
    from lm_eval.api.instance import Instance

    model = setup[0]
    lm = JaxclLM(model=model, tokenizer=ByteTokenizer(), batch_size=2)
    free = lm.generate_until(
        [Instance("generate_until", {}, ("Q: capital of Peru?\nA:", {"max_gen_toks": 24}), 0)]
    )[0]
    assert len(free.encode()) <= 24 and free
    stop = free[len(free) // 2]
    cut = lm.generate_until(
        [
            Instance(
                "generate_until",
                {},
                ("Q: capital of Peru?\nA:", {"until": [stop], "max_gen_toks": 24}),
                0,
            )
        ]
    )[0]
    assert cut == free.split(stop)[0]


def test_bad_model_args_name_the_culprit(setup, tmp_path):
    folder = str(setup[1])
    cases = [
        ({}, "exactly one model source"),
        ({"preset": "test-micro", "hf": folder}, "got preset, hf"),
        ({"preset": "test-micro", "flavour": "x"}, "unknown jaxcl model_args flavour"),
        ({"preset": "test-micro", "batch_size": "auto"}, "batch_size='auto' is not an integer"),
        ({"preset": "test-micro", "batch_size": 0}, "batch_size=0 must be at least 1"),
        ({"preset": "no-such-preset"}, "preset=no-such-preset"),
        ({"hf": str(tmp_path / "missing")}, "hf=.*missing: no such directory"),
        ({"checkpoint": str(tmp_path)}, "needs recipe=RECIPE.yaml"),
        ({"preset": "test-micro", "recipe": "r.yaml"}, "recipe= goes with checkpoint="),
        ({"preset": "test-micro", "max_length": 4096}, "max_length=4096 exceeds"),
        ({"preset": "test-micro", "dtype": "int8"}, "dtype='int8'"),
    ]
    for args, message in cases:
        with pytest.raises(ModelArgsError, match=message):
            JaxclLM.create_from_arg_obj(args, {"batch_size": 1, "device": None})
    bare = tmp_path / "bare"
    save_pretrained(setup[0], bare)  # no tokenizer files
    with pytest.raises(ModelArgsError, match="tokenizer=bytes"):
        JaxclLM(hf=str(bare))
    lm = JaxclLM.create_from_arg_string(
        f"hf={bare},tokenizer=bytes,batch_size=2", {"batch_size": 1}
    )
    assert lm.batch_size == 2 and lm.max_length == 256  # model_args win over lm-eval's default


def test_checkpoint_source_reads_a_jaxcl_run(tmp_path):
    """checkpoint=STEP_DIR with recipe=: the run's params (here its initial ones, saved as a
    checkpoint by jaxcl's own manager) on the recipe's mesh."""
    import jax
    from rich.console import Console

    from jaxcl import checkpoint
    from jaxcl.recipe import load_recipe
    from jaxcl.train.runner import make_context

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        f"name: lmeval\nout_dir: {tmp_path / 'out'}\nmodel: {{preset: test-micro}}\n"
        "stages:\n  - name: cpt\n    kind: pretrain\n    steps_per_task: 1\n    batch_size: 2\n"
        "    seq_len: 16\n    tasks:\n      - {name: a, data: {bundled: cpt/recipes}}\n"
    )
    recipe = load_recipe(recipe_file)
    run, params = make_context(recipe, Console(quiet=True))
    stage_dir = tmp_path / "out" / "checkpoints" / "cpt"
    opt_state = {"count": np.zeros((), np.int32)}
    step = checkpoint.save_checkpoint(stage_dir, 1, params, opt_state, {"stage": "cpt"})
    lm = JaxclLM(checkpoint=str(step), recipe=str(recipe_file), batch_size=2)
    assert lm.mesh is run.mesh and lm.config.hidden_size == 64
    same = JaxclLM(params=params, config=recipe.model.abstract_model().config, batch_size=2)
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, ("To make", " soup"), 0)]
    assert lm.loglikelihood(reqs)[0][0] == pytest.approx(same.loglikelihood(reqs)[0][0], abs=1e-6)
    assert jax.tree.leaves(lm.state)  # placed on the mesh


MESH_SCRIPT = """
import json
import numpy as np
from lm_eval.api.instance import Instance
from jaxcl import parallel
from jaxcl.eval.harness import JaxclLM
from jaxcl.models import from_pretrained
model = from_pretrained("test-micro", seed=1)
mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
sharded = JaxclLM(model=model, batch_size=3, mesh=mesh)
plain = JaxclLM(model=model, batch_size=3)
pairs = [("To make soup,", " mix"), ("", "Stardate"), ("Q: capital of Peru?\\nA:", " Lima"),
         ("x" * 40, " y"), ("Review: it was fine.", " positive")]
reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
gen = [Instance("generate_until", {}, ("Q: capital of Peru?\\nA:", {"max_gen_toks": 8}), 0)]
a, b = sharded.loglikelihood(reqs), plain.loglikelihood(reqs)
embed = sharded.state["embed"][...]
diff = np.abs(np.subtract([x[0] for x in a], [x[0] for x in b])).max()
print(json.dumps({
    "batch": sharded.batch_size, "diff": float(diff), "spec": str(embed.sharding.spec),
    "greedy": [x[1] for x in a] == [x[1] for x in b],
    "replicated": embed.sharding.is_fully_replicated,
    "gen": sharded.generate_until(gen) == plain.generate_until(gen)}))
"""


def test_on_a_mesh_the_scores_do_not_change():
    """Parameters sharded by the logical rules over a 2x2 (data, tensor) mesh of fake CPU
    devices, batches over data: the same log-likelihoods and generations as on one device;
    the batch size rounds up to a multiple of the data axis."""
    proc = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT],
        cwd=ROOT,
        env={**os.environ, **OFFLINE, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["batch"] == 4 and not got["replicated"] and "tensor" in got["spec"], got
    assert got["diff"] <= 1e-5 and got["greedy"] and got["gen"], got


@pytest.mark.slow
def test_bare_lm_eval_command_runs_offline(setup, mc, tmp_path):
    """lm-eval's own ``lm_eval --model jaxcl ...`` (jaxcl registered by the start-up hook the
    install puts in site-packages), offline, in a fresh process; its results file holds the
    in-process accuracy."""
    out = tmp_path / "results"
    lm_eval_script = Path(sys.executable).with_name("lm_eval")
    assert lm_eval_script.exists(), f"lm-eval's console script is not beside {sys.executable}"
    command = [
        str(lm_eval_script),
        "--model",
        "jaxcl",
        "--model_args",
        f"hf={setup[1]},batch_size=4",
        "--tasks",
        "tiny_mc",
        "--include_path",
        str(setup[2]),
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results file under {out}: {proc.stdout[-2000:]}"
    results = json.loads(files[-1].read_text())["results"]["tiny_mc"]
    assert results["acc,none"] == mc[1]["results"]["tiny_mc"]["acc,none"]
    assert "jaxcl" in proc.stdout and "tiny_mc" in proc.stdout


def test_registered_as_jaxcl_with_a_console_script():
    """``jaxcl`` in lm-eval's registry (lm-eval's own models still there), the ``jaxcl-lm-eval``
    script, and the lazy names of ``jaxcl.eval``."""
    import tomllib

    from lm_eval.api.registry import get_model

    import jaxcl

    assert get_model("jaxcl") is JaxclLM
    assert "hf" in lm_eval.api.registry.model_registry
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["jaxcl-lm-eval"] == "jaxcl.eval.harness:main"
    assert jaxcl.eval.run_lm_eval is run_lm_eval and jaxcl.eval.JaxclLM is JaxclLM


def test_start_up_hook_registers_jaxcl_lazily_in_a_fresh_process():
    """The site-packages hook: importing lm-eval's models registers ``jaxcl`` beside ``hf``
    as a placeholder, without importing JAX; asking for it imports jaxcl's adapter."""
    code = (
        "import sys, lm_eval.models\n"
        "from lm_eval.api.registry import model_registry, get_model\n"
        "assert 'hf' in model_registry and 'jaxcl' in model_registry, list(model_registry)\n"
        "assert 'jax' not in sys.modules, 'jax imported at start-up'\n"
        "assert get_model('jaxcl').__module__ == 'jaxcl.eval.harness'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bundled_tasks_are_the_probe_items_as_multiple_choice():
    """Every bundled document: distinct choices, the gold one the probe item's correct
    continuation (or the bundled task's reference), each probe prompt once."""
    from jaxcl.eval.probes import PROBES, probe_items

    for suite in PROBES:
        docs = BUNDLED_TASKS[f"jaxcl_{suite}_mc"]()
        items = [it for task in PROBES[suite] for it in probe_items(suite, task, 64)]
        correct = {it["prompt"]: it["chosen"] for it in items}
        assert [d["query"] for d in docs] == list(dict.fromkeys(d["query"] for d in docs))
        assert {d["query"] for d in docs} == set(correct)
        for d in docs:
            assert len(set(d["choices"])) == len(d["choices"]) >= 2
            assert d["choices"][d["gold"]] == correct[d["query"]]
    references = {
        ex["prompt"]: ex["response"]
        for task in ("cit/capitals", "cit/antonyms", "cit/sentiment")
        for ex in generate(task, "eval", 16)
    }
    for d in BUNDLED_TASKS["jaxcl_cit_mc"]():
        assert d["choices"][d["gold"]] == references[d["query"]]


def test_recipe_probes_and_jaxcl_eval_score_lm_eval_tasks(setup, tmp_path):
    """``probes: {lm_eval: ...}``: R^G and R^I come from lm-eval tasks before the first stage
    and after it (a LoRA stage: its adapters folded in), in results.json and report.md; the
    stage's final score equals ``jaxcl eval CKPT --lm-eval`` on its checkpoint (the
    checkpoint's own fold of the adapters, another path to the same parameters)."""
    from jaxcl.cli import main
    from jaxcl.recipe import load_recipe
    from jaxcl.report import write_report
    from jaxcl.train.runner import run_recipe

    tasks = setup[2]
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        f"name: probed\nout_dir: {tmp_path / 'out'}\nmodel: {{preset: test-micro}}\n"
        "probes:\n  builtin: false\n  lm_eval:\n"
        f"    general: [tiny_mc]\n    instruction: [tiny_gen]\n    safety: [jaxcl_safety_mc]\n"
        f"    include_path: {tasks}\n"
        "    limit: 8\n    batch_size: 4\n"
        "stages:\n  - name: cit\n    kind: instruct\n    steps_per_task: 4\n    batch_size: 4\n"
        "    seq_len: 48\n    lora: {rank: 4, alpha: 8, targets: [q, v]}\n"
        "    tasks:\n      - {name: capitals, data: {bundled: cit/capitals, train_size: 64,"
        " eval_size: 8}}\n"
    )
    results = run_recipe(load_recipe(recipe_file))
    before, after = results["probes"]["scores"]
    assert set(before) == {"general", "instruction", "safety", "tasks"}
    assert before["safety"] == before["tasks"]["lm_eval/jaxcl_safety_mc"]  # bundled, always found
    assert before["general"] == before["tasks"]["lm_eval/tiny_mc"]  # acc_norm, the first metric
    assert results["probes"]["delta_general"] == pytest.approx(after["general"] - before["general"])
    report = write_report(tmp_path / "out").read_text()
    assert "| after | jaxcl_safety_mc | tiny_gen | tiny_mc |" in report
    final = results["stages"][0]["checkpoint"]
    scores = tmp_path / "scores.json"
    argv = ["eval", final, str(recipe_file), "--lm-eval", "tiny_mc", "--lm-eval-limit", "8"]
    assert main([*argv, "--lm-eval-include", str(tasks), "--json", str(scores)]) == 0
    evaluated = json.loads(scores.read_text())["lm_eval"]["tiny_mc"]
    assert evaluated["acc_norm"] == pytest.approx(after["tasks"]["lm_eval/tiny_mc"], abs=1e-9)
