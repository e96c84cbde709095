"""`dowser make-data NAME --from SRC`: the converters from the official release files (tiny fake
releases in the official layouts, built here) to train.json / test.jsonl / images."""
import base64
import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dowser_cli import prepare as prep
from dowser_cli.errors import UserError
from dowser_cli.prepare import prepare

CAPTION = "Provide a one-sentence caption for the provided image."
CHOICE = "Answer with the option's letter from the given choices directly."


# ---- fake releases ----------------------------------------------------------------------------------

def img(path: Path, fmt: str = "JPEG", colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path, fmt)
    return path


def dump(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def karpathy_image(split, filename, sentences, filepath=None, cocoid=None):
    d = {"filename": filename, "split": split, "imgid": 0,
         "sentences": [{"raw": s, "tokens": s.lower().split(), "sentid": 0, "imgid": 0} for s in sentences]}
    if filepath is not None:
        d["filepath"], d["cocoid"] = filepath, cocoid
    return d


def coco_release(root: Path) -> Path:
    images = [karpathy_image("train", "COCO_train2014_000000000001.jpg", ["A cat.", "A cat on a mat."], "train2014", 1),
              karpathy_image("restval", "COCO_val2014_000000000002.jpg", ["A dog."], "val2014", 2),
              karpathy_image("val", "COCO_val2014_000000000003.jpg", ["A bird."], "val2014", 3),
              karpathy_image("test", "COCO_val2014_000000000004.jpg", ["A car.", "A red car."], "val2014", 4)]
    for i in images:
        img(root / i["filepath"] / i["filename"])
    dump(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return root


def flickr_release(root: Path, folder: str = "flickr30k-images") -> Path:
    images = [karpathy_image("train", "1000092795.jpg", ["Two men.", "Two young men."]),
              karpathy_image("val", "1001.jpg", ["A boat."]),
              karpathy_image("test", "1007129816.jpg", ["A man with a hat.", "A hat."])]
    for i in images:
        img(root / folder / i["filename"])
    dump(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    return root


def iconqa_release(root: Path) -> Path:
    problems = {
        "1": {"question": "Which shape is round?", "choices": ["square", "circle"], "answer": 1,
              "ques_type": "choose_txt", "grade": "prek", "label": "shape", "split": "train"},
        "2": {"question": "How many dots?", "choices": ["1", "2", "3"], "answer": 2,
              "ques_type": "choose_txt", "grade": "kindergarten", "label": "count", "split": "test"},
        "3": {"question": "Which picture?", "choices": ["image_0.png", "image_1.png"], "answer": 0,
              "ques_type": "choose_img", "split": "test"},
        "4": {"question": "Pick one.", "choices": ["a", "b"], "answer": 0, "ques_type": "choose_txt", "split": "val"},
        "5": {"question": "How many?", "answer": "4", "ques_type": "fill_in_blank", "split": "train"},
    }
    for pid, p in problems.items():
        img(root / "iconqa" / p["split"] / p["ques_type"] / pid / "image.png", "PNG")
    dump(root / "problems.json", problems)
    dump(root / "pid_splits.json", {"choose_txt_train": ["1"], "choose_txt_test": ["2"]})
    return root


WNIDS = {"n01443537": "goldfish", "n01484850": "great_white_shark", "n01494475": "hammerhead"}


def imagenet_r_release(root: Path, readme: bool = True, per_class: int = 5) -> Path:
    for wnid in WNIDS:
        for k in range(per_class):
            img(root / wnid / f"{['art', 'cartoon', 'sketch'][k % 3]}_{k}.jpg")
    if readme:
        (root / "README.txt").write_text(
            "ImageNet-R(endition) contains art, cartoons, ... renditions of 200 ImageNet classes.\n\n"
            "The classes (wnid name):\n" + "".join(f"{w} {n}\n" for w, n in WNIDS.items()))
    return root


def textvqa_release(root: Path) -> Path:
    data = [{"question_id": 34602, "question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901",
             "answers": ["nous les gosses"] * 4 + ["dakota"] * 6, "image_classes": ["Camera"], "set_name": "val"},
            {"question_id": 34603, "question": "what does the small white text spell?", "image_id": "0054c91397f2fe05",
             "answers": ["copenhagen"] * 9 + [""], "set_name": "val"}]
    for d in data:
        img(root / "train_images" / f"{d['image_id']}.jpg")
    dump(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "data": data})
    return root


def gqa_release(root: Path) -> Path:
    qs = {"20968379": {"imageId": "n288870", "question": "Do the shorts have dark color?", "answer": "yes",
                       "fullAnswer": "Yes, the shorts are dark.", "isBalanced": True},
          "20968380": {"imageId": "n161313", "question": "What is on the table?", "answer": "cup"}}
    for q in qs.values():
        img(root / "images" / f"{q['imageId']}.jpg")
    dump(root / "testdev_balanced_questions.json", qs)
    return root


def okvqa_release(root: Path) -> Path:
    qs = [{"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475},
          {"image_id": 42, "question": "What is this food called?", "question_id": 425}]
    anns = [{"image_id": 297147, "question_id": 2971475, "question_type": "four", "answer_type": "other",
             "answers": [{"answer_id": k + 1, "raw_answer": "racing", "answer": "race", "answer_confidence": "yes"}
                         for k in range(10)]},
            {"image_id": 42, "question_id": 425, "question_type": "five", "answer_type": "other",
             "answers": [{"answer_id": k + 1, "raw_answer": a, "answer": a, "answer_confidence": "yes"}
                         for k, a in enumerate(["pizza"] * 8 + ["pie"] * 2)]}]
    for q in qs:
        img(root / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg")
    dump(root / "OpenEnded_mscoco_val2014_questions.json", {"questions": qs, "data_subtype": "val2014"})
    dump(root / "mscoco_val2014_annotations.json", {"annotations": anns, "data_subtype": "val2014"})
    return root


def ocrvqa_release(root: Path) -> Path:
    def book(split, title, url):
        return {"imageURL": url, "questions": ["Who wrote this book?", "What is the title of this book?"],
                "answers": ["Sandra Boynton", title], "title": title, "authorName": "Sandra Boynton",
                "genre": "Calendars", "split": split}
    data = {"761183272": book(3, "Mom's Family Wall Calendar 2016", "http://ecx.images-amazon.com/images/I/61Y5.jpg"),
            "1603580964": book(1, "Training", "http://ecx.images-amazon.com/images/I/51a.jpg"),
            "B00KQ": book(3, "A PNG cover", "http://ecx.images-amazon.com/images/I/41b.png"),
            "0060": book(3, "Not downloaded", "http://ecx.images-amazon.com/images/I/41c.jpg")}
    img(root / "images" / "761183272.jpg")
    img(root / "images" / "1603580964.jpg")
    img(root / "images" / "B00KQ.png", "PNG")
    dump(root / "dataset.json", data)
    return root


def b64(fmt: str = "JPEG", colour=(10, 200, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]


def mmbench_tsv(path: Path, rows: list[dict] | None = None, columns=MMB_COLUMNS) -> Path:
    if rows is None:
        rows = [{"index": 0, "question": "What is the colour of the square?", "hint": "nan", "A": "green",
                 "B": "red", "C": "blue", "D": "nan", "answer": "A", "category": "attribute_recognition",
                 "image": b64(), "source": "x", "l2-category": "y", "comment": "nan", "split": "dev"},
                {"index": 1, "question": "Which is true?", "hint": "Look at the\ncorner.", "A": "yes", "B": "no",
                 "C": "", "D": "", "answer": "B", "category": "reasoning", "image": b64("PNG", (0, 0, 255)),
                 "source": "x", "l2-category": "y", "comment": "", "split": "dev"},
                {"index": 2, "question": "Same picture, other question?", "hint": "", "A": "one", "B": "two",
                 "C": "three", "D": "four", "answer": "D", "category": "counting", "image": "0", "source": "x",
                 "l2-category": "y", "comment": "", "split": "dev"}]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def conv(rid, image, prompt, answer):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": f"<image>\n{prompt}"},
                                                         {"from": "gpt", "value": answer}]}


def assert_images_resolve(out: Path, records: list[dict], source_images: Path | None = None):
    for r in records:
        assert (out / r["image"]).is_file(), r["image"]
    if source_images is not None:
        assert (out / "images").is_symlink()
        assert Path(os.readlink(out / "images")) == source_images.resolve()


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# ---- downstream -------------------------------------------------------------------------------------

def test_coco(tmp_path):
    src = coco_release(tmp_path / "coco-src")
    files = prepare("coco", src, tmp_path / "data" / "coco")
    out = tmp_path / "data" / "coco"
    assert files == {"train": out / "train.json", "test": out / "test.jsonl", "images": out / "images",
                     "manifest": out / "make-data.json"}
    train = read_json(files["train"])
    assert train == [conv("1_0", "images/train2014/COCO_train2014_000000000001.jpg", CAPTION, "A cat."),
                     conv("1_1", "images/train2014/COCO_train2014_000000000001.jpg", CAPTION, "A cat on a mat."),
                     conv("2_0", "images/val2014/COCO_val2014_000000000002.jpg", CAPTION, "A dog.")]
    test = read_jsonl(files["test"])
    assert test == [{"question_id": "4", "image": "images/val2014/COCO_val2014_000000000004.jpg", "text": CAPTION,
                     "captions": ["A car.", "A red car."]}]
    assert_images_resolve(out, train + test, src)
    manifest = read_json(files["manifest"])
    assert manifest["dataset"] == "coco" and manifest["records"] == {"train": 3, "test": 1}
    assert sorted(p.name for p in out.iterdir()) == ["images", "make-data.json", "test.jsonl", "train.json"]


def test_coco_limit(tmp_path):
    src = coco_release(tmp_path / "src")
    files = prepare("coco", src, tmp_path / "out", limit=1)
    assert [r["id"] for r in read_json(files["train"])] == ["1_0"]
    assert [r["question_id"] for r in read_jsonl(files["test"])] == ["4"]
    assert read_json(files["manifest"])["limit"] == 1


@pytest.mark.parametrize("folder", ["flickr30k-images", "images"])
def test_flickr30k(tmp_path, folder):
    src = flickr_release(tmp_path / "src", folder)
    files = prepare("flickr30k", src, tmp_path / "out")
    out = tmp_path / "out"
    train, test = read_json(files["train"]), read_jsonl(files["test"])
    assert train == [conv("1000092795_0", "images/1000092795.jpg", CAPTION, "Two men."),
                     conv("1000092795_1", "images/1000092795.jpg", CAPTION, "Two young men.")]
    assert test == [{"question_id": "1007129816", "image": "images/1007129816.jpg", "text": CAPTION,
                     "captions": ["A man with a hat.", "A hat."]}]
    assert_images_resolve(out, train + test, src / folder)


def test_iconqa(tmp_path):
    src = iconqa_release(tmp_path / "iconqa_data")
    files = prepare("iconqa", src, tmp_path / "out")
    train, test = read_json(files["train"]), read_jsonl(files["test"])
    assert train == [conv("1", "images/train/choose_txt/1/image.png",
                          f"Which shape is round?\nA. square\nB. circle\n{CHOICE}", "B")]
    assert test == [{"question_id": "2", "image": "images/test/choose_txt/2/image.png", "text": "How many dots?",
                     "options": ["1", "2", "3"], "answer": "C"}]
    assert_images_resolve(tmp_path / "out", train + test, src / "iconqa")


def test_iconqa_accepts_the_folder_above_iconqa_data(tmp_path):
    iconqa_release(tmp_path / "data" / "iconqa_data")
    files = prepare("iconqa", tmp_path / "data", tmp_path / "out")
    assert [r["question_id"] for r in read_jsonl(files["test"])] == ["2"]


def test_imagenet_r(tmp_path):
    src = imagenet_r_release(tmp_path / "imagenet-r")
    files = prepare("imagenet-r", src, tmp_path / "out")
    train, test = read_json(files["train"]), read_jsonl(files["test"])
    assert len(test) == 3 and len(train) == 12  # 20% of 5 per class held out
    names = {"n01443537": "goldfish", "n01484850": "great white shark", "n01494475": "hammerhead"}
    for r in test:
        wnid = r["image"].split("/")[1]
        assert r == {"question_id": r["question_id"], "image": r["image"],
                     "text": "What is the object in the image?", "answer": names[wnid]}
        assert r["question_id"] == f"{wnid}_{Path(r['image']).stem}"
    for r in train:
        assert r["conversations"][0]["value"] == ("<image>\nWhat is the object in the image?\n"
                                                  "Answer the question using a single word or phrase.")
        assert r["conversations"][1]["value"] == names[r["image"].split("/")[1]]
    assert sorted(r["answer"] for r in test) == sorted(names.values())  # one test image per class
    test_images = {r["image"] for r in test}
    train_images = {r["image"] for r in train}
    assert not test_images & train_images
    assert len(test_images | train_images) == 15
    assert_images_resolve(tmp_path / "out", train + test, src)
    # deterministic: the same split and order again; another seed gives another split
    again = prepare("imagenet-r", src, tmp_path / "again")
    assert again["test"].read_text() == files["test"].read_text()
    assert again["train"].read_text() == files["train"].read_text()
    other = prepare("imagenet-r", src, tmp_path / "other", seed=1)
    assert {r["image"] for r in read_jsonl(other["test"])} != test_images


def test_imagenet_r_keeps_the_authors_train_test_split(tmp_path):
    src = imagenet_r_release(tmp_path / "flat")
    ucit = tmp_path / "ImageNet-R"
    for split, keep in (("train", slice(0, 3)), ("test", slice(3, None))):
        for wnid_dir in sorted(d for d in src.iterdir() if d.is_dir()):
            (ucit / split / wnid_dir.name).mkdir(parents=True)
            for f in sorted(wnid_dir.iterdir())[keep]:
                shutil.copy(f, ucit / split / wnid_dir.name / f.name)
    shutil.copy(src / "README.txt", tmp_path / "README.txt")       # one level up, beside the split folders
    files = prepare("imagenet-r", ucit, tmp_path / "out")
    train, test = read_json(files["train"]), read_jsonl(files["test"])
    assert len(train) == 9 and len(test) == 6
    assert all(r["image"].startswith("images/train/") for r in train)
    assert all(r["image"].startswith("images/test/") for r in test)
    assert_images_resolve(tmp_path / "out", train + test, ucit)


def test_imagenet_r_split_of_a_class_does_not_depend_on_the_others(tmp_path):
    src = imagenet_r_release(tmp_path / "imagenet-r", per_class=10)
    full = {r["image"] for r in read_jsonl(prepare("imagenet-r", src, tmp_path / "a")["test"])}
    shutil.rmtree(src / "n01494475")
    fewer = {r["image"] for r in read_jsonl(prepare("imagenet-r", src, tmp_path / "b")["test"])}
    assert fewer == {i for i in full if "n01494475" not in i}


def test_imagenet_r_class_names_file(tmp_path):
    src = imagenet_r_release(tmp_path / "imagenet-r", readme=False)
    with pytest.raises(UserError, match="README.txt"):
        prepare("imagenet-r", src, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []
    names = dump(tmp_path / "imagenet_class_index.json",
                 {str(i): [w, n] for i, (w, n) in enumerate(WNIDS.items())})
    files = prepare("imagenet-r", src, tmp_path / "out", class_names=names)
    assert "great white shark" in {r["answer"] for r in read_jsonl(files["test"])}
    partial = tmp_path / "names.txt"
    partial.write_text("n01443537 goldfish\n")
    with pytest.raises(UserError, match=r"no name for 2 of the 3 classes"):
        prepare("imagenet-r", src, tmp_path / "out2", class_names=partial)


# ---- upstream ---------------------------------------------------------------------------------------

def test_textvqa(tmp_path):
    src = textvqa_release(tmp_path / "src")
    files = prepare("textvqa", src, tmp_path / "out")
    assert "train" not in files and not (tmp_path / "out" / "train.json").exists()
    test = read_jsonl(files["test"])
    assert test == [{"question_id": "34602", "image": "images/003a8ae2ef43b901.jpg",
                     "text": "what is the brand of this camera?", "answers": ["nous les gosses"] * 4 + ["dakota"] * 6},
                    {"question_id": "34603", "image": "images/0054c91397f2fe05.jpg",
                     "text": "what does the small white text spell?", "answers": ["copenhagen"] * 9 + [""]}]
    assert all(len(r["answers"]) == 10 for r in test)
    assert_images_resolve(tmp_path / "out", test, src / "train_images")


def test_gqa(tmp_path):
    src = gqa_release(tmp_path / "src")
    test = read_jsonl(prepare("gqa", src, tmp_path / "out")["test"])
    assert test == [{"question_id": "20968379", "image": "images/n288870.jpg", "text": "Do the shorts have dark color?",
                     "answer": "yes"},
                    {"question_id": "20968380", "image": "images/n161313.jpg", "text": "What is on the table?",
                     "answer": "cup"}]
    assert_images_resolve(tmp_path / "out", test, src / "images")


def test_okvqa(tmp_path):
    src = okvqa_release(tmp_path / "src")
    test = read_jsonl(prepare("okvqa", src, tmp_path / "out")["test"])
    assert test == [{"question_id": "2971475", "image": "images/COCO_val2014_000000297147.jpg",
                     "text": "What sport can you use this for?", "answers": ["race"] * 10},
                    {"question_id": "425", "image": "images/COCO_val2014_000000000042.jpg",
                     "text": "What is this food called?", "answers": ["pizza"] * 8 + ["pie"] * 2}]
    assert_images_resolve(tmp_path / "out", test, src / "val2014")


def test_ocrvqa(tmp_path):
    src = ocrvqa_release(tmp_path / "src")
    files = prepare("ocrvqa", src, tmp_path / "out")
    test = read_jsonl(files["test"])
    assert test == [{"question_id": "761183272_0", "image": "images/761183272.jpg", "text": "Who wrote this book?",
                     "answer": "Sandra Boynton"},
                    {"question_id": "761183272_1", "image": "images/761183272.jpg",
                     "text": "What is the title of this book?", "answer": "Mom's Family Wall Calendar 2016"},
                    {"question_id": "B00KQ_0", "image": "images/B00KQ.png", "text": "Who wrote this book?",
                     "answer": "Sandra Boynton"},
                    {"question_id": "B00KQ_1", "image": "images/B00KQ.png", "text": "What is the title of this book?",
                     "answer": "A PNG cover"}]
    assert read_json(files["manifest"])["skipped"] == 2  # the two questions on the cover not downloaded
    assert_images_resolve(tmp_path / "out", test, src / "images")


def test_ocrvqa_without_any_image(tmp_path):
    src = ocrvqa_release(tmp_path / "src")
    for p in (src / "images").iterdir():
        p.unlink()
    with pytest.raises(UserError, match="official downloader"):
        prepare("ocrvqa", src, tmp_path / "out")


def test_mmbench(tmp_path):
    tsv = mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv")
    files = prepare("mmbench", tsv, tmp_path / "out")
    out = tmp_path / "out"
    test = read_jsonl(files["test"])
    assert test == [{"question_id": "0", "image": "images/0.jpg", "text": "What is the colour of the square?",
                     "options": ["green", "red", "blue"], "answer": "A", "hint": "",
                     "category": "attribute_recognition"},
                    {"question_id": "1", "image": "images/1.jpg", "text": "Which is true?", "options": ["yes", "no"],
                     "answer": "B", "hint": "Look at the\ncorner.", "category": "reasoning"},
                    {"question_id": "2", "image": "images/2.jpg", "text": "Same picture, other question?",
                     "options": ["one", "two", "three", "four"], "answer": "D", "hint": "", "category": "counting"}]
    assert (out / "images").is_dir() and not (out / "images").is_symlink()
    for r in test:
        with Image.open(out / r["image"]) as im:
            assert im.format == "JPEG" and im.size == (8, 8)
    with Image.open(out / "images" / "1.jpg") as im:  # the PNG, re-encoded
        assert im.convert("RGB").getpixel((0, 0))[2] > 200
    assert (out / "images" / "2.jpg").read_bytes() == (out / "images" / "0.jpg").read_bytes()  # shared image
    assert prepare("mmbench", tsv, tmp_path / "lim", limit=2)["test"].read_text().count("\n") == 2
    assert sorted(p.name for p in (tmp_path / "lim" / "images").iterdir()) == ["0.jpg", "1.jpg"]


def test_mmbench_test_split_without_answers(tmp_path):
    tsv = mmbench_tsv(tmp_path / "mmbench_test.tsv", columns=[c for c in MMB_COLUMNS if c != "answer"])
    with pytest.raises(UserError, match="no column.*answer.*dev TSV"):
        prepare("mmbench", tsv, tmp_path / "out")


# ---- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, build, remove, named", [
    ("coco", coco_release, "dataset_coco.json", "dataset_coco.json"),
    ("flickr30k", flickr_release, "dataset_flickr30k.json", "dataset_flickr30k.json"),
    ("flickr30k", flickr_release, "flickr30k-images", "flickr30k-images/"),
    ("iconqa", iconqa_release, "problems.json", "problems.json"),
    ("textvqa", textvqa_release, "TextVQA_0.5.1_val.json", "TextVQA_0.5.1_val.json"),
    ("textvqa", textvqa_release, "train_images", "train_images/"),
    ("gqa", gqa_release, "testdev_balanced_questions.json", "testdev_balanced_questions.json"),
    ("okvqa", okvqa_release, "mscoco_val2014_annotations.json", "mscoco_val2014_annotations.json"),
    ("ocrvqa", ocrvqa_release, "dataset.json", "dataset.json"),
])
def test_missing_file_is_named(tmp_path, name, build, remove, named):
    src = build(tmp_path / "src")
    target = src / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError) as e:
        prepare(name, src, tmp_path / "out")
    assert named in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{name}: --from {src}:")
    assert leftovers(tmp_path, "out") == []


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match=r"coco: --from .*nowhere: no such folder \(expected DIR/dataset_coco.json"):
        prepare("coco", tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(UserError, match=r"mmbench: --from .*: no such file"):
        prepare("mmbench", tmp_path / "nowhere.tsv", tmp_path / "out")


def test_missing_images_are_refused(tmp_path):
    src = coco_release(tmp_path / "src")
    (src / "val2014" / "COCO_val2014_000000000004.jpg").unlink()
    with pytest.raises(UserError, match=r"1 of the 4 records' images are missing .*COCO_val2014_000000000004.jpg"):
        prepare("coco", src, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_non_empty_out_is_refused(tmp_path):
    src = gqa_release(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        prepare("gqa", src, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare("gqa", src, empty)["test"].is_file()  # an empty folder is fine


def test_out_parent_is_created(tmp_path):
    src = gqa_release(tmp_path / "src")
    files = prepare("gqa", src, tmp_path / "a" / "b" / "gqa")
    assert files["test"].is_file()


@pytest.mark.parametrize("name, build, corrupt, message", [
    ("coco", coco_release, lambda src: _edit(src / "dataset_coco.json", lambda d: d["images"][0].pop("split")),
     r"dataset_coco.json: record 0: no field 'split'"),
    ("coco", coco_release, lambda src: (src / "dataset_coco.json").write_text("{not json"),
     r"dataset_coco.json: not valid JSON \(line 1"),
    ("coco", coco_release, lambda src: _edit(src / "dataset_coco.json", lambda d: d.pop("images")),
     r"dataset_coco.json: expected Karpathy's format"),
    ("iconqa", iconqa_release, lambda src: _edit(src / "problems.json", lambda d: d["2"].update(answer=7)),
     r"problems.json: record 2: answer 7 is not an index into the 3 choices"),
    ("textvqa", textvqa_release,
     lambda src: _edit(src / "TextVQA_0.5.1_val.json", lambda d: d["data"][1].pop("answers")),
     r"TextVQA_0.5.1_val.json: record 1: no field 'answers'"),
    ("gqa", gqa_release, lambda src: _edit(src / "testdev_balanced_questions.json",
                                           lambda d: d["20968380"].update(question=None)),
     r"record 20968380: question is not a string"),
    ("okvqa", okvqa_release, lambda src: _edit(src / "mscoco_val2014_annotations.json",
                                               lambda d: d["annotations"].pop()),
     r"mscoco_val2014_annotations.json: no answers for question 425"),
    ("ocrvqa", ocrvqa_release, lambda src: _edit(src / "dataset.json", lambda d: d["761183272"]["answers"].pop()),
     r"dataset.json: record 761183272: questions and answers are not lists of the same length"),
])
def test_malformed_record(tmp_path, name, build, corrupt, message):
    src = build(tmp_path / "src")
    corrupt(src)
    with pytest.raises(UserError, match=message) as e:
        prepare(name, src, tmp_path / "out")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{name}: ")
    assert leftovers(tmp_path, "out") == []


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_mmbench_malformed_rows(tmp_path):
    rows = [{"index": 0, "question": "Q?", "A": "x", "B": "y", "answer": "C", "image": b64()}]
    with pytest.raises(UserError, match=r"record 0: answer 'C' is not one of the option letters A, B"):
        prepare("mmbench", mmbench_tsv(tmp_path / "a.tsv", rows), tmp_path / "out")
    rows = [{"index": 0, "question": "Q?", "A": "x", "B": "y", "answer": "A", "image": "!" * 100}]
    with pytest.raises(UserError, match=r"record 0: image is not a base64 image"):  # found while writing
        prepare("mmbench", mmbench_tsv(tmp_path / "b.tsv", rows), tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_an_error_while_writing_leaves_nothing_and_spares_the_source(tmp_path, monkeypatch):
    src = gqa_release(tmp_path / "src")

    def boom(path, records):
        raise OSError("disk full")
    monkeypatch.setattr(prep, "_write_jsonl", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare("gqa", src, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []
    assert sorted(p.name for p in (src / "images").iterdir()) == ["n161313.jpg", "n288870.jpg"]


def test_unknown_dataset_and_options(tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'vqav2'; available: coco, flickr30k, iconqa, imagenet-r, "
                                        r"textvqa, gqa, okvqa, ocrvqa, mmbench"):
        prepare("vqav2", tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match=r"coco: unknown option\(s\) seed \(coco takes no options\)"):
        prepare("coco", tmp_path, tmp_path / "out", seed=1)
    src = gqa_release(tmp_path / "src")
    assert prepare("gqa", src, tmp_path / "out", class_names=None)["test"].is_file()  # None: not given
    with pytest.raises(UserError, match="limit 0"):
        prepare("gqa", src, tmp_path / "out2", limit=0)


def test_registry():
    assert list(prep.PREPARERS) == ["coco", "flickr30k", "iconqa", "imagenet-r", "textvqa", "gqa", "okvqa",
                                    "ocrvqa", "mmbench"]
    for p in prep.PREPARERS.values():
        assert p.help and "\n" not in p.help and p.fn.__doc__
    assert {n for n, p in prep.PREPARERS.items() if p.role == "downstream"} == {"coco", "flickr30k", "iconqa",
                                                                                "imagenet-r"}


def test_no_torch_import():
    import subprocess
    import sys
    code = "import sys, dowser_cli.prepare; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ---- read by our evaluator and trainer -------------------------------------------------------------------

@pytest.mark.parametrize("name, build, kind, metric", [
    ("textvqa", textvqa_release, "vqa", "vqa_accuracy"),
    ("gqa", gqa_release, "vqa", "exact_match"),
    ("mmbench", None, "choice", "choice_accuracy"),
    ("iconqa", iconqa_release, "choice", "choice_accuracy"),
    ("coco", coco_release, "caption", "cider"),
    ("imagenet-r", imagenet_r_release, "vqa", "exact_match"),
])
def test_test_jsonl_is_read_by_the_evaluator(tmp_path, name, build, kind, metric):
    from dowser_cli.tasks import load_suite, read_records

    src = mmbench_tsv(tmp_path / "mmbench.tsv") if build is None else build(tmp_path / "src")
    files = prepare(name, src, tmp_path / "data" / name)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks: [{{name: t, role: upstream, kind: {kind}, metric: {metric}, "
                     f"data: 'data-root:{name}/test.jsonl'}}]\n")
    [task] = load_suite(suite, data_root=tmp_path / "data")
    records = read_records(task)
    expected = read_jsonl(files["test"])
    assert [r.id for r in records] == [e["question_id"] for e in expected]
    for r, e in zip(records, expected):
        assert isinstance(r.image, Path) and r.image.is_file()
        assert r.question == e["text"]
        if kind == "choice":
            assert r.options == e["options"] and r.answer_index == "ABCDE".index(e["answer"])
    if name == "textvqa":
        assert records[0].answers == ["nous les gosses"] * 4 + ["dakota"] * 6
    if name == "mmbench":
        assert records[1].hint == "Look at the\ncorner."


@pytest.mark.parametrize("name, build", [("coco", coco_release), ("iconqa", iconqa_release),
                                         ("imagenet-r", imagenet_r_release), ("flickr30k", flickr_release)])
def test_train_json_is_read_by_the_trainer(tmp_path, name, build):
    from dowser_cli.data import parse_record, read_records

    files = prepare(name, build(tmp_path / "src"), tmp_path / "out")
    raw = read_records(files["train"])
    assert raw == read_json(files["train"])
    for i, r in enumerate(raw):
        rec = parse_record(r, i, files["train"].parent)
        assert rec.image.is_file()
        assert [m["role"] for m in rec.messages] == ["user", "assistant"]
        assert rec.messages[0]["content"].startswith("<image>\n")


def test_relative_paths_give_an_absolute_symlink(tmp_path, monkeypatch):
    gqa_release(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    files = prepare("gqa", Path("src"), Path("data/gqa"))
    assert files["test"] == tmp_path / "data" / "gqa" / "test.jsonl"
    monkeypatch.chdir(tmp_path / "data")  # the link resolves from anywhere
    assert_images_resolve(tmp_path / "data" / "gqa", read_jsonl(files["test"]), tmp_path / "src" / "images")
    assert Path(os.readlink(tmp_path / "data" / "gqa" / "images")).is_absolute()


# ---- from the command line --------------------------------------------------------------------------------

def test_make_data_from_the_cli_feeds_a_paper_style_suite_through_data_root(tmp_path):
    from conftest import ROOT, run_cli

    src = iconqa_release(tmp_path / "release")
    r = run_cli("make-data", "iconqa", "--from", src, "--out", "data/iconqa", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "test\t" in r.stdout and (tmp_path / "data" / "iconqa" / "train.json").is_file()
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n"
                     "  - {name: iconqa, role: downstream, kind: choice, data: 'data-root:iconqa/test.jsonl'}\n"
                     f"  - {{name: facts, role: upstream, kind: likelihood, metric: choice_likelihood, limit: 4,\n"
                     f"     data: {ROOT}/dowser_cli/configs/tasks/data/facts.jsonl}}\n")
    rep = run_cli("eval-forgetting", "--base", "tiny-llava", "--tasks", suite, "--data-root", "data", "--out", "report",
                  "--json", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    rows = json.loads(rep.stdout)
    assert rows[0]["model"].startswith("base") and "iconqa" in rows[0]["scores"]
    # the same suite without the data root it needs: one line naming the file it looked for
    miss = run_cli("eval-forgetting", "--base", "tiny-llava", "--tasks", suite, "--data-root", "elsewhere",
                   "--out", "report2", cwd=tmp_path)
    assert miss.returncode == 2 and "elsewhere/iconqa/test.jsonl does not exist" in miss.stderr
    assert len(miss.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, want", [
    (["make-data", "coco", "--out", "o"], "make-data coco: needs --from"),
    (["make-data", "shapes", "--from", "x", "--out", "o"], "a built-in dataset takes no --from"),
    (["make-data", "nosuch", "--out", "o"], "unknown dataset 'nosuch'; available: digits, shapes, zorbish, coco"),
    (["make-data", "coco", "--from", "missing", "--out", "o"], "missing"),
    (["make-data", "gqa", "--from", ".", "--out", "o", "--class-names", "n.txt"], "--class-names is for imagenet-r"),
])
def test_make_data_mistakes_are_one_line_exit_2(tmp_path, args, want):
    from conftest import run_cli

    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and want in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
