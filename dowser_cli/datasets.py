"""Built-in data that needs no download: the scikit-learn digits (1,797 real 8x8 handwritten digits) as a
downstream image task, split once (seeded) into a training set and a held-out test set.

    dowser make-data digits --out data/digits     # images/, train.json (LLaVA conversations), test.jsonl
Suites refer to the same files as ``builtin:digits/test.jsonl`` (materialised in the dowser cache)."""
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


BUILTIN = {"digits": write_digits}


def builtin(spec: str) -> Path:
    """``digits/test.jsonl`` -> that file of the built-in dataset, written to the cache on first use."""
    from dowser_cli.models.embedded import _publish, cache_dir

    name, _, rel = spec.partition("/")
    if name not in BUILTIN:
        raise UserError(f"builtin:{spec}: unknown built-in dataset {name!r}; available: {', '.join(BUILTIN)}")
    target = cache_dir() / "data" / name
    if not target.exists():
        _publish(lambda tmp: BUILTIN[name](tmp), target)
    return target / rel
