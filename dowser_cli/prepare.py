"""Converters from the official release files of the paper's datasets to our formats, for
``dowser make-data NAME --from SRC --out DIR``.

What is written to DIR:

- ``train.json`` (downstream sets only): a JSON list of LLaVA conversation records,
  ``{"id", "image": "images/REL", "conversations": [{"from": "human", "value": "<image>\\nPROMPT"},
  {"from": "gpt", "value": ANSWER}]}``.
- ``test.jsonl``: one evaluation record per line, ``{"question_id", "image": "images/REL", "text", ...}``
  with ``answer`` (one answer; for multiple choice the option's letter, beside ``options``), ``answers``
  (the VQA annotators') or ``captions`` (caption references).
- ``images``: a symlink to the absolute path of the source folder that holds the images (nothing is
  copied); MMBench's TSV holds its images as base64, decoded into a real ``images/`` folder.
- ``make-data.json``: what was converted (dataset, source, limit, options, record counts).

Image paths are relative to DIR, so a suite's default image folder (the data file's directory) finds
them. DIR is written atomically: into a temporary directory beside it, renamed into place at the end,
removed on any error. Nothing here imports torch."""
from __future__ import annotations

import base64
import binascii
import csv
import inspect
import io
import json
import os
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from dowser_cli.errors import UserError

IMAGES = "images"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
LETTERS = "ABCDEFGHIJ"

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
# the authors' ImageNet-R records (Model-Dowser's data/imagenet-r/test.json) ask exactly this
CLASS_QUESTION = "What is the object in the image?"
CLASS_SUFFIX = "Answer the question using a single word or phrase."


@dataclass
class Rows:
    """What one dataset's reader found: the records in our formats and where their images are."""
    test: list[dict]
    train: list[dict] | None = None          # None: an upstream (evaluation-only) set
    image_root: Path | None = None           # DIR/images links here; records say images/REL for image_root/REL
    embedded: dict[str, str] | None = None   # MMBench: REL -> base64 image, decoded into DIR/images/REL
    skipped: int = 0                         # records left out because their image was not downloaded


@dataclass(frozen=True)
class Preparer:
    name: str
    help: str                                # one line: what --from is
    fn: Callable[..., Rows]
    role: str = "downstream"                 # downstream (train.json + test.jsonl) | upstream (test.jsonl)


# ---- shared helpers: reading ------------------------------------------------------------------------

def _fail(name: str, source: Path, msg: str) -> UserError:
    return UserError(f"{name}: --from {source}: {msg}")


def _dir(name: str, source: Path, expected: str) -> None:
    if not source.is_dir():
        what = "not a folder" if source.exists() else "no such folder"
        raise _fail(name, source, f"{what} (expected {expected})")


def _load_json(name: str, source: Path, path: Path, expected: str) -> Any:
    """The parsed file; a missing or unreadable one is one line saying what was expected."""
    if not path.is_file():
        raise _fail(name, source, f"no {path.name} ({expected})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{name}: {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _folder(name: str, source: Path, *candidates: str) -> Path:
    """The first of ``source/candidate`` that is a folder."""
    for c in candidates:
        if (source / c).is_dir():
            return source / c
    raise _fail(name, source, f"no image folder {' or '.join(c + '/' for c in candidates)}")


@contextmanager
def _record(where: str, key: Any) -> Iterator[None]:
    """Turn a record's missing field or wrong type into one line naming the file and the record."""
    try:
        yield
    except KeyError as e:
        raise UserError(f"{where}: record {key}: no field {e.args[0]!r}") from None
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"{where}: record {key}: {e}") from None


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _text(value: Any, what: str, empty_ok: bool = False) -> str:
    """A string field (numbers are taken as their text), stripped; empty only where ``empty_ok`` (an
    annotator's answer is kept as the dataset has it)."""
    _expect(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{what} is not a string ({value!r})")
    _expect(empty_ok or str(value).strip() != "", f"{what} is empty")
    return str(value).strip()


def _train(rid: str, image: str, prompt: str, answer: str) -> dict:
    return {"id": rid, "image": f"{IMAGES}/{image}",
            "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]}


def _test(qid: str, image: str, text: str, **answer: Any) -> dict:
    return {"question_id": qid, "image": f"{IMAGES}/{image}", "text": text, **answer}


def _choice_prompt(question: str, options: list[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{lines}\n{CHOICE_SUFFIX}"


# ---- downstream datasets ------------------------------------------------------------------------------

def _karpathy(name: str, source: Path, file: Path, image_root: Path, image_of: Callable[[dict], str],
              id_of: Callable[[dict], str]) -> Rows:
    """Karpathy's caption split file (``dataset_coco.json`` / ``dataset_flickr30k.json`` of
    caption_datasets.zip): ``{"images": [{"filename", "split": train|restval|val|test, "sentences":
    [{"raw", ...}], ...}]}``. Train = train + restval, one record per caption; test = test, one record
    per image with all its captions; val is left out."""
    data = _load_json(name, source, file, f"Karpathy's split file; expected {file}")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{name}: {file}: expected Karpathy's format {{\"images\": [...]}}")
    train, test = [], []
    for i, img in enumerate(images):
        with _record(f"{name}: {file}", i):
            split = img["split"]
            rel, rid = image_of(img), id_of(img)
            captions = [_text(s["raw"], "sentences[].raw") for s in img["sentences"]]
            _expect(bool(captions), "no sentences")
            if split in ("train", "restval"):
                train += [_train(f"{rid}_{k}", rel, CAPTION_PROMPT, c) for k, c in enumerate(captions)]
            elif split == "test":
                test.append(_test(rid, rel, CAPTION_PROMPT, captions=captions))
            else:
                _expect(split == "val", f"split {split!r} (expected train, restval, val or test)")
    return Rows(test=test, train=train, image_root=image_root)


def coco(source: Path) -> Rows:
    """COCO captions in Karpathy's split: ``--from DIR`` with ``dataset_coco.json`` (Karpathy's
    caption_datasets.zip) and the COCO 2014 image folders it names (``train2014/``, ``val2014/``, from
    cocodataset.org). Each image record has ``filepath`` (the folder), ``filename`` and ``cocoid``."""
    expected = "DIR/dataset_coco.json and DIR/train2014/, DIR/val2014/"
    _dir("coco", source, expected)
    file = source / "dataset_coco.json"
    if not file.is_file():
        raise _fail("coco", source, f"no dataset_coco.json (Karpathy's split file; expected {expected})")
    return _karpathy("coco", source, file, source.resolve(),
                     image_of=lambda img: f"{_text(img['filepath'], 'filepath')}/{_text(img['filename'], 'filename')}",
                     id_of=lambda img: str(int(img["cocoid"])))


def flickr30k(source: Path) -> Rows:
    """Flickr30k in Karpathy's split: ``--from DIR`` with ``dataset_flickr30k.json`` (Karpathy's
    caption_datasets.zip; image records have ``filename`` but no ``filepath``) and the images of the
    official flickr30k-images.tar in ``flickr30k-images/`` (or ``images/``)."""
    expected = "DIR/dataset_flickr30k.json and DIR/flickr30k-images/"
    _dir("flickr30k", source, expected)
    file = source / "dataset_flickr30k.json"
    if not file.is_file():
        raise _fail("flickr30k", source, f"no dataset_flickr30k.json (Karpathy's split file; expected {expected})")
    root = _folder("flickr30k", source, "flickr30k-images", "images")
    return _karpathy("flickr30k", source, file, root.resolve(),
                     image_of=lambda img: _text(img["filename"], "filename"),
                     id_of=lambda img: PurePosixPath(_text(img["filename"], "filename")).stem)


def iconqa(source: Path) -> Rows:
    """IconQA's multi-text-choice sub-task: ``--from`` the release folder ``iconqa_data`` (from
    iconqa_data.zip, github.com/lupantech/IconQA): ``problems.json`` maps pid -> {question, choices,
    answer (index into choices), ques_type, split, ...}; the images are
    ``iconqa/{split}/{ques_type}/{pid}/image.png``. Only ``ques_type`` choose_txt; train = split train,
    test = split test (val is left out). Answers are option letters."""
    expected = "the IconQA release folder iconqa_data with problems.json and iconqa/{train,val,test}/"
    _dir("iconqa", source, expected)
    if not (source / "problems.json").is_file() and (source / "iconqa_data" / "problems.json").is_file():
        source = source / "iconqa_data"  # given the folder that holds iconqa_data/
    file = source / "problems.json"
    problems = _load_json("iconqa", source, file, f"expected {expected}")
    if not isinstance(problems, dict):
        raise UserError(f"iconqa: {file}: expected a mapping pid -> problem")
    root = source / "iconqa"
    if not root.is_dir():
        raise _fail("iconqa", source, f"no image folder iconqa/ (expected {expected})")
    train, test = [], []
    for pid, p in problems.items():
        with _record(f"iconqa: {file}", pid):
            if p["ques_type"] != "choose_txt" or p["split"] not in ("train", "test"):
                continue
            question = _text(p["question"], "question")
            options = [_text(c, "choices[]") for c in p["choices"]]
            _expect(2 <= len(options) <= len(LETTERS), f"{len(options)} choices")
            answer = p["answer"]
            _expect(isinstance(answer, int) and 0 <= answer < len(options),
                    f"answer {answer!r} is not an index into the {len(options)} choices")
            rel = f"{p['split']}/choose_txt/{pid}/image.png"
            if p["split"] == "train":
                train.append(_train(str(pid), rel, _choice_prompt(question, options), LETTERS[answer]))
            else:
                test.append(_test(str(pid), rel, question, options=options, answer=LETTERS[answer]))
    return Rows(test=test, train=train, image_root=root.resolve())


_WNID = re.compile(r"^(n\d{8})\s+(\S.*?)\s*$")


def _class_names(path: Path) -> dict[str, str]:
    """wnid -> name from a text file of ``wnid name`` lines (ImageNet-R's README.txt lists its 200
    classes so, after some prose) or a JSON file ({wnid: name}, or {"0": [wnid, name], ...} as in
    imagenet_class_index.json)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"imagenet-r: class names {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        out = {}
        for k, v in (data.items() if isinstance(data, dict) else []):
            if isinstance(v, str):
                out[k] = v
            elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v):
                out[v[0]] = v[1]
        return out
    return {m.group(1): m.group(2) for m in map(_WNID.match, text.splitlines()) if m}


def imagenet_r(source: Path, class_names: Path | None = None, test_fraction: float = 0.2, seed: int = 0) -> Rows:
    """ImageNet-R: ``--from`` the folder extracted from imagenet-r.tar (github.com/hendrycks/imagenet-r):
    200 wnid subfolders of images and ``README.txt``, whose ``wnid name`` lines name the classes
    (``class_names``, a file of such lines or a JSON map, replaces it). A folder with ``train/`` and
    ``test/`` of wnid subfolders (UCIT's ImageNet-R, the split the authors' data files use) keeps that
    split (README.txt there or one level up). Otherwise there is no official split: each class's
    sorted files are shuffled with a seed of its own (``seed`` and the wnid) and ``test_fraction`` of
    them held out; records are then shuffled (same seed) so that the first N mix the classes. Answers are
    class names with spaces for underscores."""
    expected = "the extracted imagenet-r/ folder: 200 wnid subfolders and README.txt"
    _dir("imagenet-r", source, expected)
    try:
        test_fraction, seed = float(test_fraction), int(seed)
    except (TypeError, ValueError):
        raise UserError(f"imagenet-r: test fraction {test_fraction!r} / seed {seed!r}: expected numbers") from None
    if not 0 < test_fraction < 1:
        raise UserError(f"imagenet-r: test fraction {test_fraction}: expected a number between 0 and 1")
    presplit = (source / "train").is_dir() and (source / "test").is_dir()
    # the authors' split (UCIT's ImageNet-R: train/<wnid>/, test/<wnid>/) is kept as it is
    roots = {"train": source / "train", "test": source / "test"} if presplit else {"": source}
    classes = sorted({d.name for r in roots.values() for d in r.iterdir() if d.is_dir()
                      and re.fullmatch(r"n\d{8}", d.name)})
    if not classes:
        raise _fail("imagenet-r", source, f"no wnid subfolders (n01443537/, ...; expected {expected})")
    names_file = Path(class_names).expanduser() if class_names else source / "README.txt"
    if not class_names and presplit and not names_file.is_file():
        names_file = source.parent / "README.txt"
    if not names_file.is_file():
        if class_names:
            raise UserError(f"imagenet-r: class names {names_file}: no such file")
        raise _fail("imagenet-r", source, "no README.txt naming the classes (the one in imagenet-r.tar; or give "
                                          "a class-names file of 'wnid name' lines)")
    names = _class_names(names_file)
    unnamed = [w for w in classes if w not in names]
    if unnamed:
        raise UserError(f"imagenet-r: {names_file}: no name for {len(unnamed)} of the {len(classes)} classes "
                        f"(e.g. {unnamed[0]}); expected 'wnid name' lines")
    train_rows, test_rows = [], []
    def images(folder: Path) -> list[str]:
        return sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS) \
            if folder.is_dir() else []

    for wnid in classes:
        label = names[wnid].replace("_", " ").strip()
        if presplit:
            for split, rows in (("train", train_rows), ("test", test_rows)):
                rows += [(f"{wnid}_{PurePosixPath(f).stem}", f"{split}/{wnid}/{f}", label)
                         for f in images(roots[split] / wnid)]
            continue
        files = images(source / wnid)
        random.Random(f"{seed}/{wnid}").shuffle(files)
        n_test = max(1, round(len(files) * test_fraction)) if len(files) > 1 else 0
        for k, fname in enumerate(files):
            (test_rows if k < n_test else train_rows).append((f"{wnid}_{PurePosixPath(fname).stem}",
                                                              f"{wnid}/{fname}", label))
    for rows in (train_rows, test_rows):
        rows.sort()
        random.Random(seed).shuffle(rows)
    train = [_train(rid, rel, f"{CLASS_QUESTION}\n{CLASS_SUFFIX}", label) for rid, rel, label in train_rows]
    test = [_test(rid, rel, CLASS_QUESTION, answer=label) for rid, rel, label in test_rows]
    return Rows(test=test, train=train, image_root=source.resolve())


# ---- upstream datasets ------------------------------------------------------------------------------------

def textvqa(source: Path) -> Rows:
    """TextVQA's validation set: ``--from DIR`` with ``TextVQA_0.5.1_val.json`` ({"data": [{question_id,
    question, image_id, answers (10), ...}]}, textvqa.org) and ``train_images/`` (train_val_images.zip:
    the val images are among the train images), as LLaVA's docs/Evaluation.md lays it out."""
    expected = "DIR/TextVQA_0.5.1_val.json and DIR/train_images/"
    _dir("textvqa", source, expected)
    file = source / "TextVQA_0.5.1_val.json"
    data = _load_json("textvqa", source, file, f"expected {expected}")
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise UserError(f"textvqa: {file}: expected {{\"data\": [...]}}")
    root = _folder("textvqa", source, "train_images")
    test = []
    for i, r in enumerate(rows):
        with _record(f"textvqa: {file}", i):
            answers = [_text(a, "answers[]", empty_ok=True) for a in r["answers"]]
            _expect(bool(answers), "no answers")
            test.append(_test(str(r["question_id"]), f"{_text(r['image_id'], 'image_id')}.jpg",
                              _text(r["question"], "question"), answers=answers))
    return Rows(test=test, image_root=root.resolve())


def gqa(source: Path) -> Rows:
    """GQA's test-dev balanced questions: ``--from DIR`` with ``testdev_balanced_questions.json``
    (questions1.2.zip: {qid: {imageId, question, answer, ...}}) and ``images/`` (images.zip, {imageId}.jpg),
    from cs.stanford.edu/people/dorarad/gqa."""
    expected = "DIR/testdev_balanced_questions.json and DIR/images/"
    _dir("gqa", source, expected)
    file = source / "testdev_balanced_questions.json"
    data = _load_json("gqa", source, file, f"expected {expected}")
    if not isinstance(data, dict):
        raise UserError(f"gqa: {file}: expected a mapping question id -> question")
    root = _folder("gqa", source, "images")
    test = []
    for qid, q in data.items():
        with _record(f"gqa: {file}", qid):
            test.append(_test(str(qid), f"{_text(q['imageId'], 'imageId')}.jpg", _text(q["question"], "question"),
                              answer=_text(q["answer"], "answer", empty_ok=True)))
    return Rows(test=test, image_root=root.resolve())


def okvqa(source: Path) -> Rows:
    """OK-VQA's validation set: ``--from DIR`` with ``OpenEnded_mscoco_val2014_questions.json``
    ({"questions": [{question_id, image_id, question}]}), ``mscoco_val2014_annotations.json``
    ({"annotations": [{question_id, answers: [{answer, raw_answer, ...}] (10)}]}), both from
    okvqa.allenai.org, and COCO's ``val2014/`` (COCO_val2014_{image_id:012d}.jpg)."""
    expected = ("DIR/OpenEnded_mscoco_val2014_questions.json, DIR/mscoco_val2014_annotations.json "
                "and DIR/val2014/")
    _dir("okvqa", source, expected)
    qfile, afile = source / "OpenEnded_mscoco_val2014_questions.json", source / "mscoco_val2014_annotations.json"
    questions = _load_json("okvqa", source, qfile, f"expected {expected}")
    annotations = _load_json("okvqa", source, afile, f"expected {expected}")
    qs = questions.get("questions") if isinstance(questions, dict) else None
    anns = annotations.get("annotations") if isinstance(annotations, dict) else None
    if not isinstance(qs, list):
        raise UserError(f"okvqa: {qfile}: expected {{\"questions\": [...]}}")
    if not isinstance(anns, list):
        raise UserError(f"okvqa: {afile}: expected {{\"annotations\": [...]}}")
    answers: dict[str, list[str]] = {}
    for i, a in enumerate(anns):
        with _record(f"okvqa: {afile}", i):
            answers[str(a["question_id"])] = [_text(x["answer"], "answers[].answer", empty_ok=True)
                                           for x in a["answers"]]
    root = _folder("okvqa", source, "val2014")
    test = []
    for i, q in enumerate(qs):
        with _record(f"okvqa: {qfile}", i):
            qid = str(q["question_id"])
            if not answers.get(qid):
                raise UserError(f"okvqa: {afile}: no answers for question {qid} of {qfile.name}")
            test.append(_test(qid, f"COCO_val2014_{int(q['image_id']):012d}.jpg", _text(q["question"], "question"),
                              answers=answers[qid]))
    return Rows(test=test, image_root=root.resolve())


def ocrvqa(source: Path) -> Rows:
    """OCR-VQA's test split: ``--from DIR`` with ``dataset.json`` ({id: {imageURL, questions, answers,
    title, authorName, genre, split: 1 train | 2 val | 3 test}}, ocr-vqa.github.io) and ``images/``
    where the official downloader saved {id}{extension of imageURL}. Split 3, one record per question;
    questions whose image was not downloaded are left out (and counted)."""
    expected = "DIR/dataset.json and DIR/images/ (the official downloader's {id}.jpg files)"
    _dir("ocrvqa", source, expected)
    file = source / "dataset.json"
    data = _load_json("ocrvqa", source, file, f"expected {expected}")
    if not isinstance(data, dict):
        raise UserError(f"ocrvqa: {file}: expected a mapping id -> book")
    root = _folder("ocrvqa", source, "images")
    on_disk = {}
    for entry in os.scandir(root):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in IMAGE_EXTS and entry.is_file():
            on_disk.setdefault(stem, entry.name)
    test, skipped = [], 0
    for key, book in data.items():
        with _record(f"ocrvqa: {file}", key):
            if int(book["split"]) != 3:
                continue
            qs, ans = book["questions"], book["answers"]
            _expect(isinstance(qs, list) and isinstance(ans, list) and len(qs) == len(ans),
                    "questions and answers are not lists of the same length")
            image = on_disk.get(str(key))
            if image is None:
                skipped += len(qs)
                continue
            test += [_test(f"{key}_{k}", image, _text(q, "questions[]"), answer=_text(a, "answers[]", empty_ok=True))
                     for k, (q, a) in enumerate(zip(qs, ans))]
    if not test and skipped:
        raise _fail("ocrvqa", source, f"no image of the test split's {skipped} questions in {root} "
                                      "(run the official downloader first: it saves images/{id}.jpg)")
    return Rows(test=test, image_root=root.resolve(), skipped=skipped)


def _missing(value: Any) -> bool:
    """An empty cell as pandas writes it (and as LLaVA's MMBench script reads it): '', nan, none."""
    return value is None or str(value).strip().lower() in ("", "nan", "none")


def read_tsv(path: Path) -> tuple[list[str], list[dict]]:
    """A UTF-8 TSV with a header row: (columns, rows). MMBench's cells hold base64 images, far above
    csv's default 128 KiB field limit, which is lifted while reading (and restored)."""
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            return list(reader.fieldnames or []), list(reader)
    finally:
        csv.field_size_limit(old)


def mmbench(source: Path) -> Rows:
    """MMBench: ``--from`` one of its TSV files (e.g. mmbench_dev_20230712.tsv, mmbench_dev_cn_20231003.tsv
    from download.openmmlab.com) with columns index, question, hint, A..D (the options; the first empty
    one ends them), answer (a letter), image (a base64 image; in some releases the index of the row
    whose image it shares) and category. Images are decoded into DIR/images/{index}.jpg."""
    name = "mmbench"
    if not source.is_file():
        raise _fail(name, source, "no such file (expected an MMBench TSV, e.g. mmbench_dev_20230712.tsv)"
                    if not source.exists() else "not a file (expected an MMBench TSV, e.g. mmbench_dev_20230712.tsv)")
    try:
        columns, rows = read_tsv(source)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{name}: {source}: not a UTF-8 TSV ({e})") from None
    lacking = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in columns]
    if lacking:
        extra = " (a test split without answers cannot be scored; use a dev TSV)" if lacking == ["answer"] else ""
        raise UserError(f"{name}: {source}: no column(s) {', '.join(lacking)}{extra}; "
                        f"expected MMBench's index, question, hint, A, B, C, D, answer, image")
    images = {str(r["index"]): r["image"] for r in rows}
    test, embedded = [], {}
    for r in rows:
        with _record(f"{name}: {source}", r.get("index")):
            index = _text(r["index"], "index")
            options = []
            for letter in LETTERS:
                if letter not in r or _missing(r[letter]):
                    break
                options.append(str(r[letter]).strip())
            _expect(len(options) >= 2, f"{len(options)} options")
            answer = _text(r["answer"], "answer").upper()
            _expect(answer in LETTERS[:len(options)], f"answer {r['answer']!r} is not one of the option letters "
                                                      f"{', '.join(LETTERS[:len(options)])}")
            image = r["image"] or ""
            if len(image) <= 64:  # a reference to the row that holds the image
                _expect(len(images.get(image.strip(), "")) > 64, f"image {image!r} is neither base64 nor an index")
                image = images[image.strip()]
            embedded[f"{index}.jpg"] = image
            rec = _test(index, f"{index}.jpg", _text(r["question"], "question"), options=options, answer=answer,
                        hint="" if _missing(r.get("hint")) else str(r["hint"]).strip())
            if not _missing(r.get("category")):
                rec["category"] = str(r["category"]).strip()
            test.append(rec)
    return Rows(test=test, embedded=embedded)


PREPARERS: dict[str, Preparer] = {p.name: p for p in (
    Preparer("coco", "a folder with Karpathy's dataset_coco.json and COCO's train2014/, val2014/", coco),
    Preparer("flickr30k", "a folder with Karpathy's dataset_flickr30k.json and flickr30k-images/", flickr30k),
    Preparer("iconqa", "the IconQA release folder iconqa_data (problems.json, iconqa/)", iconqa),
    Preparer("imagenet-r", "the extracted imagenet-r/ folder (200 wnid subfolders, README.txt)", imagenet_r),
    Preparer("textvqa", "a folder with TextVQA_0.5.1_val.json and train_images/", textvqa, "upstream"),
    Preparer("gqa", "a folder with testdev_balanced_questions.json and images/", gqa, "upstream"),
    Preparer("okvqa", "a folder with OK-VQA's OpenEnded_mscoco_val2014_questions.json, "
                      "mscoco_val2014_annotations.json and COCO's val2014/", okvqa, "upstream"),
    Preparer("ocrvqa", "a folder with OCR-VQA's dataset.json and the downloaded images/", ocrvqa, "upstream"),
    Preparer("mmbench", "an MMBench TSV file (e.g. mmbench_dev_20230712.tsv)", mmbench, "upstream"),
)}


# ---- shared helpers: writing -----------------------------------------------------------------------------

def _check_images(name: str, records: list[dict], root: Path) -> None:
    missing = [root / PurePosixPath(r["image"]).relative_to(IMAGES) for r in records]
    missing = [p for p in missing if not p.is_file()]
    if missing:
        raise UserError(f"{name}: {len(missing)} of the {len(records)} records' images are missing "
                        f"(e.g. {missing[0]}); is the image folder complete?")


def _decode_images(name: str, source: Path, embedded: dict[str, str], records: list[dict], folder: Path) -> None:
    """Each record's base64 image into ``folder``: JPEG bytes as they are, anything else re-encoded."""
    from PIL import Image

    folder.mkdir()
    for r in records:
        rel = str(PurePosixPath(r["image"]).relative_to(IMAGES))
        try:
            data = base64.b64decode(embedded[rel], validate=False)
            if data[:3] != b"\xff\xd8\xff":
                buf = io.BytesIO()
                with Image.open(io.BytesIO(data)) as im:
                    im.convert("RGB").save(buf, "JPEG", quality=95)
                data = buf.getvalue()
        except (binascii.Error, ValueError, OSError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"{name}: {source}: record {r['question_id']}: image is not a base64 image ({e})") from None
        (folder / rel).write_bytes(data)


def _write_json_list(path: Path, records: list[dict]) -> None:
    """A JSON list with one record per line (valid JSON, and greppable)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write(name: str, source: Path, out: Path, rows: Rows, limit: int | None, options: dict) -> dict[str, Path]:
    train = rows.train[:limit] if rows.train is not None and limit else rows.train
    test = rows.test[:limit] if limit else rows.test
    if not test:
        raise _fail(name, source, "no test records found")
    if train is not None and not train:
        raise _fail(name, source, "no training records found")
    if rows.image_root is not None:
        _check_images(name, test + (train or []), rows.image_root)
    from dowser_cli.artifacts import atomic_dir   # (artifacts loads torch: only when writing)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:      # out appears whole (or stays as it was); a symlink in tmp is never followed
        if rows.embedded is not None:
            _decode_images(name, source, rows.embedded, test, tmp / IMAGES)
        else:
            os.symlink(rows.image_root, tmp / IMAGES, target_is_directory=True)
        if train is not None:
            _write_json_list(tmp / "train.json", train)
        _write_jsonl(tmp / "test.jsonl", test)
        manifest = {"dataset": name, "source": str(source.resolve()), "limit": limit,
                    "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
                    "records": {"train": len(train) if train is not None else None, "test": len(test)},
                    "images": str(rows.image_root) if rows.image_root is not None else "decoded from the TSV",
                    "skipped": rows.skipped}
        (tmp / "make-data.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    files = {"test": out / "test.jsonl", "images": out / IMAGES, "manifest": out / "make-data.json"}
    if train is not None:
        files["train"] = out / "train.json"
    return files


def prepare(name: str, source: Path, out: Path, limit: int | None = None, **options) -> dict[str, Path]:
    """Convert dataset ``name``'s official files at ``source`` into ``out`` (train.json for downstream
    sets, test.jsonl, images/, make-data.json). ``limit`` keeps the first N records of each split;
    ``options`` go to the dataset's converter (imagenet-r: class_names, test_fraction, seed; None
    values are ignored). Unknown name -> UserError listing the available ones. Returns {"train", "test",
    "images", "manifest"} (no train for upstream sets)."""
    prep = PREPARERS.get(name)
    if prep is None:
        raise UserError(f"make-data: unknown dataset {name!r}; available: {', '.join(PREPARERS)}")
    options = {k: v for k, v in options.items() if v is not None}
    accepted = [p for p in inspect.signature(prep.fn).parameters if p != "source"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"takes {', '.join(accepted)}" if accepted else "takes no options"
        raise UserError(f"{name}: unknown option(s) {', '.join(unknown)} ({name} {takes})")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"{name}: limit {limit!r}: expected a positive number of records")
    source, out = Path(source).expanduser(), Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{name}: --out {out}: exists and is not an empty folder")
    rows = prep.fn(source, **options)
    return _write(name, source, out, rows, limit, options)
