"""Built-in data (dowser_cli/datasets.py) and the embedded upstream suite's generated items."""
import json
import subprocess
import sys


from dowser_cli import datasets
from dowser_cli.tasks import load_suite, read_records

from conftest import ROOT, run_cli


def test_shapes_are_seeded_held_out_and_show_the_colour_they_are_labelled(tmp_path):
    from PIL import Image

    a = datasets.write_shapes(tmp_path / "a", n_train=40, n_test=10)
    b = datasets.write_shapes(tmp_path / "b", n_train=40, n_test=10)
    assert a["train"].read_text() == b["train"].read_text() and a["test"].read_text() == b["test"].read_text()
    train = json.loads(a["train"].read_text())
    test = [json.loads(line) for line in a["test"].read_text().splitlines()]
    assert len(train) == 40 and len(test) == 10
    assert not {r["image"] for r in train} & {r["image"] for r in test}
    for r in train[:20]:
        colour = r["conversations"][1]["value"]
        shape = r["conversations"][0]["value"].removeprefix("<image>\nWhat colour is the ").removesuffix("?")
        assert colour in datasets.COLOURS and shape in datasets.SHAPES
        px = Image.open(a["images"].parent / r["image"]).convert("RGB")
        assert px.size == (datasets.SHAPES_SIDE, datasets.SHAPES_SIDE)
        # the labelled colour covers a good part of the image (the rest is the grey background)
        share = sum(1 for p in px.getdata() if p == datasets.COLOURS[colour]) / px.size[0] ** 2
        assert share > 0.04, (r["image"], share)
    # the six colours all occur and no answer dominates the held-out split
    full = [json.loads(line) for line in datasets.write_shapes(tmp_path / "c")["test"].read_text().splitlines()]
    counts = {c: sum(r["answer"] == c for r in full) for c in datasets.COLOURS}
    assert len(full) == 200 and min(counts.values()) > 10 and max(counts.values()) < 0.3 * len(full)


def test_make_data_shapes_from_the_cli(tmp_path):
    r = run_cli("make-data", "shapes", "--out", tmp_path / "d", "--train", "8", "--test", "4")
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "d" / "train.json").read_text())) == 8
    r = run_cli("make-data", "nope", "--out", tmp_path / "e")
    assert r.returncode == 2 and "unknown dataset 'nope'; available: digits, shapes" in r.stderr


def test_shipped_upstream_items_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, "scripts/make_upstream_suite.py", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    for name in ("words", "opposites", "reading"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (ROOT / "dowser_cli/configs/tasks/data" / f"{name}.jsonl").read_text()


def test_demo_suite_has_300_upstream_items_over_abilities_disjoint_from_the_downstream_answers():
    tasks = load_suite(ROOT / "dowser_cli/configs/tasks/demo.yaml")
    up = [t for t in tasks if t.in_u]
    items = {t.name: read_records(t) for t in up}
    assert sum(len(v) for v in items.values()) >= 300 and len(up) >= 4
    down_words = set(datasets.COLOURS) | set(datasets.SHAPES)
    for name, recs in items.items():
        for r in recs:
            words = set((r.question + " " + " ".join(r.answers + r.options)).lower().replace("?", " ").split())
            assert not words & down_words, (name, r.question)
    for t in up:
        if t.metric == "choice_likelihood":
            for r in items[t.name]:
                assert len(r.options) == 4 and len(set(r.options)) == 4 and r.answer_index is not None
    opposites = {r.question: r.answers[0] for r in items["opposites"]}
    assert len(opposites) == len(items["opposites"])          # no word asked twice with two answers


def test_zorbish_is_text_only_with_held_out_numbers_and_text_demo_shares_the_demos_upstream(tmp_path):
    files = datasets.write("zorbish", tmp_path / "z")
    train = json.loads(files["train"].read_text())
    test = [json.loads(x) for x in files["test"].read_text().splitlines()]
    assert len(train) == 800 and len(test) == 200 and not any("image" in r for r in train + test)
    assert train[0]["conversations"][1]["value"] == datasets.zorbish(int(train[0]["id"].split("-")[1]))
    assert datasets.zorbish(472) == "re-ne-mi" and datasets.zorbish(0) == "zo"
    numbers = lambda rs, key: {r[key] for r in rs}   # noqa: E731
    assert not numbers(train, "id") & numbers(test, "question_id")
    demo = {t.name: t for t in load_suite(ROOT / "dowser_cli/configs/tasks/demo.yaml") if t.role == "upstream"}
    text = load_suite(ROOT / "dowser_cli/configs/tasks/text-demo.yaml")
    assert {t.name: t for t in text if t.role == "upstream"} == demo
    down = [t for t in text if t.role == "downstream"]
    assert [t.name for t in down] == ["zorbish"] and len(read_records(down[0])) == 100
