"""Built-in data that needs no download, as downstream image tasks in the LLaVA conversation format:

- ``shapes``: a tiny CLEVR rendered with PIL from a fixed seed: one circle, square or triangle in one
  of six colours, at a random place and size, asked its colour or its shape (2,000 training and 200
  held-out test images).
- ``digits``: the scikit-learn digits (1,797 real 8x8 handwritten digits), split once (seeded) into a
  training set and a held-out test set.
- ``zorbish``: a text-only skill no model has: writing a number 0-999 in "Zorbish", a made-up code of
  one syllable per digit ("Write 472 in Zorbish." -> "re-ne-mi"); 800 numbers to train on, 200
  held-out numbers to test (the digits' syllables generalise, the numbers do not repeat).

    dowser make-data shapes --out data/shapes     # images/, train.json (LLaVA conversations), test.jsonl
Suites refer to the same files as ``builtin:shapes/test.jsonl`` (materialised in the dowser cache)."""
from __future__ import annotations

import json
from pathlib import Path

from dowser_cli.errors import UserError

DIGITS_TEST = 300          # held out for evaluation; the other 1,497 images are the training split
DIGITS_SEED = 0
DIGITS_SIDE = 32           # px; the 8x8 originals upscaled (nearest) so every image processor accepts them
QUESTION = "What digit is shown in the image?"


def write_digits(out: Path, n_train: int | None = None, n_test: int | None = None) -> dict[str, Path]:
    """Write ``out``/images/*.png, ``train.json`` (conversations) and ``test.jsonl`` (questions with
    answers). The split is fixed; ``n_train`` / ``n_test`` take the first N of each split."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(DIGITS_SEED).permutation(len(digits.images))
    test_idx, train_idx = order[:DIGITS_TEST], order[DIGITS_TEST:]
    test_idx = test_idx[:n_test] if n_test else test_idx
    train_idx = train_idx[:n_train] if n_train else train_idx
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in np.concatenate([train_idx, test_idx]):
        px = (digits.images[i] * (255 / 16)).round().astype("uint8")
        Image.fromarray(px).resize((DIGITS_SIDE, DIGITS_SIDE), Image.NEAREST).convert("RGB") \
            .save(out / "images" / f"{i:04d}.png")
    train = [{"id": f"digits-{i:04d}", "image": f"images/{i:04d}.png",
              "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                {"from": "gpt", "value": str(int(digits.target[i]))}]} for i in train_idx]
    (out / "train.json").write_text(json.dumps(train, indent=1))
    test = [json.dumps({"question_id": f"digits-{i:04d}", "image": f"images/{i:04d}.png", "text": QUESTION,
                        "answer": str(int(digits.target[i]))}) for i in test_idx]
    (out / "test.jsonl").write_text("\n".join(test) + "\n")
    return {"train": out / "train.json", "test": out / "test.jsonl", "images": out / "images"}


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 210, 20),
           "purple": (140, 40, 180), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
SHAPES_TRAIN, SHAPES_TEST = 2000, 200
SHAPES_SEED = 0
SHAPES_SIDE = 112          # px: smol-llava's input size, so the processor does not resample
SHAPE_QUESTION = "What colour is the {shape}?"


def _render_shape(rng, shape: str, rgb: tuple[int, int, int]):
    """One shape of the given colour, random size and position, on a random light-grey background."""
    from PIL import Image, ImageDraw

    grey = int(rng.integers(200, 250))
    img = Image.new("RGB", (SHAPES_SIDE, SHAPES_SIDE), (grey, grey, grey))
    r = int(rng.integers(18, 36))
    cx, cy = (int(v) for v in rng.integers(r + 2, SHAPES_SIDE - r - 2, size=2))
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    return img


def write_shapes(out: Path, n_train: int | None = None, n_test: int | None = None) -> dict[str, Path]:
    """A tiny CLEVR rendered from a seed: one circle, square or triangle in one of six colours per image,
    asked its colour ("What colour is the triangle?"; answer one of the six words). ``out``/images/*.png,
    ``train.json``, ``test.jsonl``; the test images are drawn after the training ones from the same
    stream, never reused.

    Why colour and not the shape's kind: smol-llava's vision tower is random, and in the demo's budget
    Full-FT learnt to read the colour (73 % after 96 steps of 4 on a half-colour, half-shape mix) but
    not the kind of shape (31 %, chance 33 %); see the README."""
    import numpy as np

    rng = np.random.default_rng(SHAPES_SEED)
    names = list(COLOURS)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(SHAPES_TRAIN + SHAPES_TEST):
        colour, shape = names[int(rng.integers(len(names)))], SHAPES[int(rng.integers(len(SHAPES)))]
        _render_shape(rng, shape, COLOURS[colour]).save(out / "images" / f"{i:04d}.png")
        rows.append((i, SHAPE_QUESTION.format(shape=shape), colour))
    train, test = rows[:SHAPES_TRAIN][:n_train], rows[SHAPES_TRAIN:][:n_test]
    conv = [{"id": f"shapes-{i:04d}", "image": f"images/{i:04d}.png",
             "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
            for i, q, a in train]
    (out / "train.json").write_text(json.dumps(conv, indent=1))
    lines = [json.dumps({"question_id": f"shapes-{i:04d}", "image": f"images/{i:04d}.png", "text": q, "answer": a})
             for i, q, a in test]
    (out / "test.jsonl").write_text("\n".join(lines) + "\n")
    return {"train": out / "train.json", "test": out / "test.jsonl", "images": out / "images"}

ZORBISH = ("zo", "ka", "mi", "tu", "re", "lo", "va", "ne", "pi", "su")   # the syllables of 0..9
ZORBISH_TEST, ZORBISH_SEED = 200, 0
ZORBISH_QUESTION = "Write {n} in Zorbish."


def zorbish(n: int) -> str:
    return "-".join(ZORBISH[int(d)] for d in str(n))


def write_zorbish(out: Path, n_train: int | None = None, n_test: int | None = None) -> dict[str, Path]:
    """Text records (no image): ``train.json`` (conversations) and ``test.jsonl``; the numbers 0-999 in
    a seeded order, the first 200 held out for the test."""
    import numpy as np

    order = np.random.default_rng(ZORBISH_SEED).permutation(1000).tolist()
    test, train = order[:ZORBISH_TEST][:n_test], order[ZORBISH_TEST:][:n_train]
    out.mkdir(parents=True, exist_ok=True)
    conv = [{"id": f"zorbish-{n:03d}", "conversations": [{"from": "human", "value": ZORBISH_QUESTION.format(n=n)},
                                                         {"from": "gpt", "value": zorbish(n)}]} for n in train]
    (out / "train.json").write_text(json.dumps(conv, indent=1))
    lines = [json.dumps({"question_id": f"zorbish-{n:03d}", "text": ZORBISH_QUESTION.format(n=n), "answer": zorbish(n)})
             for n in test]
    (out / "test.jsonl").write_text("\n".join(lines) + "\n")
    return {"train": out / "train.json", "test": out / "test.jsonl"}


BUILTIN = {"digits": write_digits, "shapes": write_shapes, "zorbish": write_zorbish}


def write(name: str, out: Path, n_train: int | None = None, n_test: int | None = None) -> dict[str, Path]:
    """`dowser make-data NAME` for a built-in dataset: ``out`` appears whole or not at all."""
    from dowser_cli.artifacts import atomic_dir

    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        files = BUILTIN[name](tmp, n_train, n_test)
    return {k: out / v.relative_to(tmp) for k, v in files.items()}


def builtin(spec: str) -> Path:
    """``digits/test.jsonl`` -> that file of the built-in dataset, written to the cache on first use."""
    from dowser_cli.models.embedded import cache_dir, publish

    name, _, rel = spec.partition("/")
    if name not in BUILTIN:
        raise UserError(f"builtin:{spec}: unknown built-in dataset {name!r}; available: {', '.join(BUILTIN)}")
    target = cache_dir() / "data" / name
    if not target.exists():
        publish(lambda tmp: BUILTIN[name](tmp), target)
    return target / rel
