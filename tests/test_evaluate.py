"""dowser eval-forgetting on tiny models: report structure, cache hits, drift, and bad input."""
import json
import shutil

import pytest
import torch

from dowser_cli import artifacts, drift, evaluate, finetune, tasks
from dowser_cli.evaluate import EvalConfig
from dowser_cli.finetune import FinetuneConfig

from conftest import ROOT, run_cli

SUITE = """
tasks:
  - {name: digits, role: downstream, kind: vqa, metric: exact_match, data: "builtin:digits/test.jsonl", limit: 6,
     max_new_tokens: 3}
  - {name: facts, role: upstream, kind: exact, metric: contains, data: FACTS, limit: 5, max_new_tokens: 4}
  - {name: facts-choice, role: upstream, kind: likelihood, metric: choice_likelihood, data: FACTS, limit: 5,
     answer_template: "The answer is {answer}."}
  - {name: drift, role: upstream, kind: drift, samples: 4, seq_len: 12}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny suite and two tiny-llava runs (Full-FT and a longer one) on the digits training split."""
    from dowser_cli.datasets import write_digits

    d = tmp_path_factory.mktemp("ev")
    (d / "suite.yaml").write_text(SUITE.replace("FACTS", str(ROOT / "dowser_cli" / "configs" / "tasks" / "data" / "facts.jsonl")))
    files = write_digits(d / "digits", n_train=16, n_test=4)
    for name, steps in (("run-a", 1), ("run-b", 3)):
        finetune.run("tiny-llava", files["train"], d / name, FinetuneConfig(lr=1e-3, max_steps=steps, batch_size=4,
                                                                                    warmup_ratio=0.0))
    return d


def test_report_for_two_runs_then_cache_hits(setup, tmp_path):
    out = tmp_path / "report"
    rep = evaluate.run("tiny-llava", [setup / "run-a"], setup / "suite.yaml", out, EvalConfig(batch_size=4))
    assert rep["cache"] == {"hits": 0, "evaluated": 8}
    rep = evaluate.run("tiny-llava", [setup / "run-a", setup / "run-b"], setup / "suite.yaml", out,
                       EvalConfig(batch_size=4))
    assert rep["cache"] == {"hits": 8, "evaluated": 4}             # only the new run was evaluated
    rows = rep["rows"]
    assert [r["model"] for r in rows] == ["base (tiny-llava)", "run-a", "run-b"]
    for r in rows:
        assert set(r["scores"]) == {"digits", "facts", "facts-choice", "drift"}
        assert r["D"] == r["scores"]["digits"]
        assert r["U"] == pytest.approx((r["scores"]["facts"] + r["scores"]["facts-choice"]) / 2, abs=0.01)
        want_h = 0 if r["U"] + r["D"] == 0 else 2 * r["U"] * r["D"] / (r["U"] + r["D"])
        assert r["H"] == pytest.approx(want_h, abs=0.01)
        assert r["dU"] == pytest.approx(r["U"] - rows[0]["U"], abs=0.01)
    assert rows[0]["drift"] == 0 and rows[1]["drift"] > 0 and rows[2]["drift"] > rows[1]["drift"]
    assert "drift_vs_dU" in rep
    md = (out / "report.md").read_text()
    assert "| run-b | full-ft |" in md and "D: digits" in md and "U: facts-choice" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert artifacts.read_yaml(out / "report.yaml")["rows"] == rows
    # every score carries its 95 % interval, recomputed from the cached per-item scores
    for r in rows:
        for key in ("digits", "facts", "facts-choice", "drift", "D", "U", "H", "dU"):
            lo, hi = r["ci95"][key]
            v = r["scores"][key] if key in r["scores"] else r[key]
            assert lo - 0.02 <= v <= hi + 0.02, (r["model"], key)      # both are rounded to 0.01
    assert rows[0]["ci95"]["dU"] == [0.0, 0.0] and rep["items"]["facts"] == 5
    assert f"| {rows[2]['D']:.2f} [{rows[2]['ci95']['D'][0]:.2f}, {rows[2]['ci95']['D'][1]:.2f}] |" in md


def test_choice_likelihood_with_a_shared_prompt_cache_equals_one_sequence_per_option(setup):
    """The text-only fast path (one prompt pass, its cache repeated per option) against the plain one."""
    from dowser_cli.data import Encoder
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source("tiny-llava")
    lm = load_model(src, load_config(src), torch.float32, "cpu")
    task = [t for t in tasks.load_suite(setup / "suite.yaml") if t.name == "facts-choice"][0]
    recs = tasks.read_records(task)
    cands = [[task.answer_template.format(answer=o) for o in r.options] for r in recs]
    cands[2] = cands[2][:3]                                        # unequal counts split the batch
    enc = Encoder(lm.tokenizer, lm.processor, 512)
    fast = evaluate._shared_prompt_logprobs(lm, task, recs, cands, enc, 8, "cpu", lambda k: None)
    for rec, cs, got in zip(recs, cands, fast):
        ids = evaluate.prompt_ids(enc, tasks.render_prompt(task, rec), None)
        for c, (lp, n) in zip(cs, got):
            a = lm.tokenizer(c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([ids + a])).logits[0].double()
            want = float(torch.log_softmax(logits, -1)[len(ids) - 1:-1].gather(-1, torch.tensor(a)[:, None]).sum())
            assert n == len(a) and lp == pytest.approx(want, abs=1e-4)


def test_drift_is_the_kl_of_next_token_distributions(setup):
    """Against a brute-force KL on one sequence: sum_v p log(p / q), mean over positions."""
    from dowser_cli.artifacts.runs import open_run
    from dowser_cli.models.runs import load_run
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source("tiny-llava")
    base = load_model(src, load_config(src), torch.float32, "cpu")
    tuned = load_run(open_run(setup / "run-b"))
    seq = [256, 40, 50, 60, 70, 80]
    sums, counts = drift.kl_per_sequence(base, tuned, [seq], 1, "cpu")
    got = sums[0] / counts[0]
    with torch.no_grad():
        p = torch.softmax(base.model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        q = torch.softmax(tuned.model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
    want = float((p * (p / q).log()).sum(-1).mean())
    assert got == pytest.approx(want, rel=1e-4) and got > 0


def test_json_on_stdout(setup, tmp_path):
    r = run_cli("eval-forgetting", "--base", "tiny-llava", setup / "run-a", "--tasks", setup / "suite.yaml",
                "--out", tmp_path / "rep", "--json", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["model"] for x in rows] == ["base (tiny-llava)", "run-a"] and all("H" in x for x in rows)


@pytest.mark.parametrize("case", ["missing-file", "unknown-metric", "other-base", "unknown-kind"])
def test_bad_input_one_line_exit_2(setup, tmp_path, case):
    suite = tmp_path / "s.yaml"
    text = (setup / "suite.yaml").read_text()
    run = setup / "run-a"
    if case == "missing-file":
        text = text.replace("builtin:digits/test.jsonl", "nowhere/test.jsonl")
        want = "does not exist"
    elif case == "unknown-metric":
        text = text.replace("metric: contains", "metric: bleu")
        want = "unknown metric 'bleu'"
    elif case == "unknown-kind":
        text = text.replace("kind: exact", "kind: essay")
        want = "unknown kind 'essay'"
    else:
        shutil.copytree(run, tmp_path / "run")
        run, want = tmp_path / "run", "different base model"
        text = text  # the suite is fine; the run's base is tiny-llava, the report's tiny-llama
    suite.write_text(text)
    base = "tiny-llama" if case == "other-base" else "tiny-llava"
    r = run_cli("eval-forgetting", "--base", base, run, "--tasks", suite, "--out", tmp_path / "rep")
    assert r.returncode == 2 and want in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "rep").exists()


def test_shipped_suites_are_well_formed():
    for path in (ROOT / "dowser_cli" / "configs" / "tasks").glob("*.yaml"):
        ts = tasks.load_suite(path, check_files=False)
        assert ts and all(t.kind in tasks.KINDS or (t.harness, t.kind) == ("lmms-eval", "lmms") for t in ts), path
    demo = tasks.load_suite(ROOT / "dowser_cli" / "configs" / "tasks" / "demo.yaml")
    assert {t.role for t in demo} == {"downstream", "upstream"} and any(t.kind == "drift" for t in demo)


def test_a_users_suite_includes_a_shipped_suite_by_name(tmp_path):
    """include: resolves beside the including file first, then among the shipped suites by name; a name
    that is neither is one line naming the suite and listing the shipped ones."""
    (tmp_path / "mine.jsonl").write_text('{"question_id": "m0", "text": "Say hi.", "answer": "hi"}\n')
    (tmp_path / "mine.yaml").write_text("include: [paper-upstream]\ntasks:\n  - {name: mine, role: downstream, "
                                        "kind: vqa, metric: exact_match, data: mine.jsonl}\n")
    got = tasks.load_suite(tmp_path / "mine.yaml", check_files=False)
    shipped = tasks.load_suite("paper-upstream", check_files=False)
    assert [t.name for t in got] == [t.name for t in shipped] + ["mine"]
    (tmp_path / "bad.yaml").write_text("include: [no-such-suite]\ntasks: []\n")
    with pytest.raises(tasks.UserError, match=r"--tasks .*bad.yaml: include no-such-suite: no such file, nor a shipped "
                                        r"name; names: .*paper-upstream"):
        tasks.load_suite(tmp_path / "bad.yaml", check_files=False)


@pytest.fixture(scope="module")
def seeded(setup):
    """Two methods over two seeds, 2 steps each with a snapshot after every step: full-ft-s<N> and
    attn-s<N> (--targets attn), runs named as scripts/compare_methods.sh names them."""
    from dowser_cli.datasets import write_digits

    d = setup / "seeded"
    files = write_digits(d / "digits", n_train=16, n_test=4)
    for seed in (0, 1):
        for name, extra in (("full-ft", {}), ("attn", {"targets": "attn"})):
            finetune.run("tiny-llava", files["train"], d / f"{name}-s{seed}",
                         FinetuneConfig(lr=1e-3, max_steps=2, batch_size=4, warmup_ratio=0.0, seed=seed,
                                        snapshot_every=1, **extra))
    return d


def test_snapshots_make_forgetting_curves_and_runs_pair_by_seed_and_step(setup, seeded, tmp_path):
    out = tmp_path / "rep"
    runs = [seeded / f"{m}-s{s}" for s in (0, 1) for m in ("full-ft", "attn")]
    r = run_cli("eval-forgetting", "--base", "tiny-llava", *runs, "--tasks", setup / "suite.yaml", "--out", out,
                "--batch-size", "4", "--snapshots", "--reference", "full-ft", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    labels = [x["model"] for x in rows]
    assert labels[:4] == ["base (tiny-llava)", "full-ft-s0@1", "full-ft-s0@2", "full-ft-s0"]
    assert len(rows) == 1 + 4 * 3
    final = {x["model"]: x for x in rows}
    # the last snapshot is the finished run: the same delta, the same scores (a cache hit)
    assert final["attn-s1@2"]["U"] == final["attn-s1"]["U"] and final["attn-s1"]["step"] == 2
    rep = artifacts.read_yaml(out / "report.yaml")
    p = rep["paired"]
    assert p["reference"] == "full-ft"
    pair = {(x["model"], x["step"]): x for x in p["pairs"]}
    assert set(pair) == {(f"attn-s{s}{a}", st) for s in (0, 1) for a, st in (("@1", 1), ("@2", 2), ("", 2))}
    x = pair[("attn-s1@1", 1)]
    assert x["reference"] == "full-ft-s1@1"
    assert x["dU"] == pytest.approx(final["attn-s1@1"]["U"] - final["full-ft-s1@1"]["U"], abs=0.011)
    assert x["ddrift"] == pytest.approx(final["attn-s1@1"]["drift"] - final["full-ft-s1@1"]["drift"], rel=1e-3, abs=1e-6)
    for k in ("dD", "dU", "dH", "ddrift"):
        lo, hi = x["ci95"][k]
        assert lo <= x[k] + 1e-6 and x[k] <= hi + 1e-6
    pooled = {(y["group"], y["step"]): y for y in p["pooled"]}
    y = pooled[("attn", 1)]
    assert y["seeds"] == [0, 1]
    assert y["dU"] == pytest.approx((pair[("attn-s0@1", 1)]["dU"] + pair[("attn-s1@1", 1)]["dU"]) / 2, abs=0.011)
    assert y["per_seed"]["dU"] == [pair[("attn-s0@1", 1)]["dU"], pair[("attn-s1@1", 1)]["dU"]]
    md = (out / "report.md").read_text()
    assert "## Forgetting curves" in md and "| attn-s0 | 1 |" in md
    assert "## Paired against full-ft" in md and "| attn-s1@1 | full-ft-s1@1 | 1 |" in md and "Pooled over seeds" in md
    assert (out / "report-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["drift_vs_dU"]["runs"] == 8       # a run's end and its last snapshot are one model
    # the seeds' table: the runs' ends only, with the pooled paired ΔU against the reference
    import subprocess
    import sys
    agg = subprocess.run([sys.executable, str(ROOT / "scripts" / "aggregate_seeds.py"), str(out)], capture_output=True,
                         text=True, check=True).stdout
    y2 = {(z["group"], z["step"]): z for z in p["pooled"]}[("attn", 2)]
    want = f"{y2['dU']:+.2f} [{y2['ci95']['dU'][0]:+.2f}, {y2['ci95']['dU'][1]:+.2f}] (seeds 0,1)"
    assert "ΔU vs full-ft (paired, pooled)" in agg and want in agg and "(reference)" in agg and "@" not in agg
    # one snapshot by RUN@STEP, from the cache
    r = run_cli("eval-forgetting", "--base", "tiny-llava", f"{seeded / 'attn-s0'}@1", "--tasks", setup / "suite.yaml",
                "--out", out, "--batch-size", "4", "--json")
    assert r.returncode == 0, r.stderr
    one = json.loads(r.stdout)[1]
    assert one["model"] == "attn-s0@1" and one["U"] == final["attn-s0@1"]["U"]


@pytest.mark.parametrize("case", ["step", "reference"])
def test_bad_snapshot_or_reference_one_line_exit_2(setup, seeded, tmp_path, case):
    args = {"step": [f"{seeded / 'attn-s0'}@7"],
            "reference": [seeded / "attn-s0", "--reference", "lora"]}[case]
    r = run_cli("eval-forgetting", "--base", "tiny-llava", *args, "--tasks", setup / "suite.yaml",
                "--out", tmp_path / "rep", "--batch-size", "4")
    want = {"step": "no snapshot at step 7; it has 1, 2",
            "reference": "--reference lora: no such run or method among the runs; names: attn, attn-s0"}[case]
    assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_drift_tracking_spearman_with_an_interval_over_models():
    rows = [{"drift": d, "dU": -u} for d, u in [(0.1, 1), (0.2, 3), (0.3, 2), (0.4, 5), (0.5, 4), (0.6, 7)]]
    got = evaluate._drift_tracking(rows, EvalConfig(bootstrap=300))
    # ranks of drift 1..6 against loss ranks 1,3,2,5,4,6: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 210
    assert got["runs"] == 6 and got["spearman"] == pytest.approx(1 - 24 / 210, abs=1e-4)
    lo, hi = got["ci95"]
    assert -1 <= lo <= got["spearman"] <= hi <= 1


def test_answers_stop_at_the_generation_configs_turn_end_not_only_the_tokenizers_eos(setup):
    """A chat model whose turn end is not its tokenizer's EOS (Gemma 3: generation config [1, 106],
    tokenizer EOS 1): the answer stops at the turn end, as the checkpoint's own generate() would."""
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source("tiny-llava")
    lm = load_model(src, load_config(src), torch.float32, "cpu")
    task = [t for t in tasks.load_suite(setup / "suite.yaml") if t.name == "facts"][0]
    task.max_new_tokens = 6
    recs = tasks.read_records(task)[:2]
    seen, decode = [], lm.tokenizer.decode

    def answer_ids(o, **kw):                        # the generated ids, before decoding
        seen.append([int(i) for i in o if int(i) != evaluate._pad_id(lm)])
        return decode(o, **kw)

    lm.tokenizer.decode = answer_ids
    evaluate.generate_answers(lm, task, recs, 2, 512, "cpu", torch.float32, lambda k: None)
    free = seen[0]
    assert len(free) == 6 and lm.tokenizer.eos_token_id not in free[:3]    # it runs on past a third token
    lm.model.generation_config.eos_token_id = [free[2]]
    assert lm.stop_ids() == [free[2], lm.tokenizer.eos_token_id]
    seen.clear()
    evaluate.generate_answers(lm, task, recs, 2, 512, "cpu", torch.float32, lambda k: None)
    assert seen[0] == free[:3]                       # stopped at the turn end, which it keeps
    assert evaluate.stop_key(lm) == f"{free[2]},{lm.tokenizer.eos_token_id}"
