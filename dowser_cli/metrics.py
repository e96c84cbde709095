"""Evaluation metrics as pure functions of strings and numbers (no model, no files): VQA accuracy with
the VQA benchmark's answer normalisation, exact / contained match, multiple-choice parsing, CIDEr-D
(through pycocoevalcap's scorer), and the paper's H-score."""
from __future__ import annotations

import re
from typing import Sequence

import torch

# ---- answer normalisation (the VQA benchmark's rules, written from its description) ---------------------

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
          "*", "#", "%", "^", "&", "$", ":", "'"]
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                 "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
                 "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've",
                 "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
                 "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't",
                 "youre": "you're", "youve": "you've", "lets": "let's"}
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.|\.(?!\d)")  # "3.5" keeps its period, "cat." loses it


def normalize_vqa(answer: str) -> str:
    """Lower case; punctuation dropped (or turned into a space when it separates words); a period only
    kept inside a number; number words to digits; articles dropped; common contractions restored."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA benchmark's accuracy: min(#annotators who gave the prediction / 3, 1), averaged over the
    leave-one-annotator-out subsets of the (usually 10) human answers."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa(prediction)
    gts = [normalize_vqa(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(accs) / len(accs)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_vqa(prediction)
    return float(any(pred == normalize_vqa(a) for a in answers))


def contains_match(prediction: str, answers: Sequence[str]) -> float:
    """1 when a reference answer appears as whole words in the prediction ("The capital is Paris.")."""
    pred = f" {normalize_vqa(prediction)} "
    return float(any(f" {normalize_vqa(a)} " in pred for a in answers if normalize_vqa(a)))


# ---- multiple choice ------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_choice(prediction: str, options: Sequence[str]) -> int | None:
    """Index of the option a free-text answer picks, or None. Tries, in order: a leading letter
    ("B", "(B)", "B. cat"), "answer is B", an option's text contained in the answer (unique), and a
    single standalone option letter anywhere."""
    letters = LETTERS[:len(options)]
    text = prediction.strip()
    m = re.match(r"^\(?([A-Z])\)?(?:[.:)\s]|$)", text)
    if m and m.group(1) in letters:
        return letters.index(m.group(1))
    m = re.search(r"answer(?:\s+is)?\s*[:\-]?\s*\(?([A-Z])\)?(?:[.:)\s]|$)", text, re.IGNORECASE)
    if m and m.group(1).upper() in letters:
        return letters.index(m.group(1).upper())
    norm = f" {normalize_vqa(text)} "
    hits = [i for i, o in enumerate(options) if normalize_vqa(str(o)) and f" {normalize_vqa(str(o))} " in norm]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:  # "cat" and "black cat": the longest contained option is the one named
        longest = max(hits, key=lambda i: len(normalize_vqa(str(options[i]))))
        if sum(len(normalize_vqa(str(options[i]))) == len(normalize_vqa(str(options[longest]))) for i in hits) == 1:
            return longest
    standalone = {c for c in re.findall(r"\b([A-Z])\b", text) if c in letters}
    if len(standalone) == 1:
        return letters.index(standalone.pop())
    return None


def choice_accuracy(prediction: str, options: Sequence[str], answer: int) -> float:
    return float(parse_choice(prediction, options) == answer)


def answer_index(answer: str, options: Sequence[str]) -> int:
    """The correct option of a record whose answer is a letter ("C") or the option's text."""
    a = str(answer).strip()
    if len(a) == 1 and a.upper() in LETTERS[:len(options)]:
        return LETTERS.index(a.upper())
    for i, o in enumerate(options):
        if normalize_vqa(str(o)) == normalize_vqa(a):
            return i
    raise ValueError(f"answer {answer!r} is neither an option letter nor an option's text")


# ---- captioning ----------------------------------------------------------------------------------------

def caption_tokens(text: str) -> str:
    """Lower-case words without punctuation, space-joined (what the COCO scorers expect after their
    PTB tokeniser, which needs Java; this keeps the same words without it)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def cider_d(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D (n = 1..4, sigma 6, x10) from pycocoevalcap's scorer: (corpus score, per id)."""
    from pycocoevalcap.cider.cider import Cider

    ids = list(predictions)
    gts = {i: [caption_tokens(r) for r in references[i]] for i in ids}
    res = {i: [caption_tokens(predictions[i])] for i in ids}
    score, per = Cider().compute_score(gts, res)
    return float(score), {i: float(s) for i, s in zip(ids, per)}


# ---- the paper's summary ------------------------------------------------------------------------------

def h_score(upstream: float, downstream: float) -> float:
    """Harmonic mean H = 2UD / (U + D) of upstream (kept) and downstream (learnt) scores."""
    if upstream + downstream == 0:
        return 0.0
    return 2 * upstream * downstream / (upstream + downstream)


# ---- intervals ------------------------------------------------------------------------------------------

def bootstrap_indices(n_items: int, replicates: int, seed: int) -> torch.Tensor:
    """[replicates, n_items] item indices drawn with replacement (seeded: the same draw for every model,
    which is what makes the ΔU interval paired)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n_items, (replicates, n_items), generator=g)


def percentile_interval(reps: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """(lo, hi) percentile interval of bootstrap replicates [..., R] along the last axis."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=reps.dtype)
    lo, hi = torch.quantile(reps, q, dim=-1)
    return float(lo), float(hi)


def bootstrap_replicates(items: dict[str, torch.Tensor], down: Sequence[str], up: Sequence[str],
                         replicates: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Bootstrap replicates [models, R] of every task score and of D, U, H and ΔU.

    ``items[task]`` is [models, n_items]: each model's score per item of that task (row 0 the base).
    Each task's items are resampled on their own (a stratified bootstrap: tasks keep their sizes); the
    same draw serves every model, so any difference of two models' replicates is paired. D and U are
    the means of their tasks' replicate means and H = 2UD/(U+D) of each replicate, as the point
    estimates are; ΔU = U - U_base."""
    reps = {}
    for k, (name, x) in enumerate(items.items()):
        idx = bootstrap_indices(x.shape[1], replicates, seed + 7919 * k)
        reps[name] = x.double()[:, idx].mean(-1)                 # [models, R]
    d = torch.stack([reps[n] for n in down]).mean(0)
    u = torch.stack([reps[n] for n in up]).mean(0)
    reps.update(D=d, U=u, H=torch.where(u + d > 0, 2 * u * d / (u + d).clamp_min(1e-12), torch.zeros_like(u)),
                dU=u - u[0:1])
    return reps


def bootstrap_report(items: dict[str, torch.Tensor], down: Sequence[str], up: Sequence[str], replicates: int = 1000,
                     seed: int = 0, level: float = 0.95) -> list[dict[str, tuple[float, float]]]:
    """95 % bootstrap intervals of every task score, D, U, H and ΔU, for each model (``bootstrap_replicates``'
    draws). Returns per model {task: (lo, hi), "D", "U", "H", "dU"}."""
    reps = bootstrap_replicates(items, down, up, replicates, seed)
    n_models = next(iter(items.values())).shape[0]
    return [{n: percentile_interval(v[m], level) for n, v in reps.items()} for m in range(n_models)]


def ratio_replicates(num: torch.Tensor, den: torch.Tensor, replicates: int = 1000, seed: int = 0) -> torch.Tensor:
    """Bootstrap replicates [..., R] of sum(num) / sum(den) over units (the last axis of num, den
    [..., n]; e.g. drift: per probe sequence the summed KL and its position count), whole units
    resampled, the same draw for every leading row (paired)."""
    idx = bootstrap_indices(num.shape[-1], replicates, seed)
    return num.double()[..., idx].sum(-1) / den.double()[..., idx].sum(-1).clamp_min(1e-12)


def paired_difference(reps: torch.Tensor, pairs: Sequence[tuple[int, int]], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over ``pairs`` (model, reference) of the replicate-by-replicate
    difference reps[model] - reps[reference] (reps [models, R], drawn on the same resamples for every
    model). One pair: the paired bootstrap interval of a difference; several (one per seed): of the
    mean difference over seeds, with the items' noise only."""
    diff = torch.stack([reps[m] - reps[r] for m, r in pairs]).mean(0)
    return percentile_interval(diff, level)


def ratio_interval(num: torch.Tensor, den: torch.Tensor, replicates: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of sum(num) / sum(den) over units [n] (e.g. drift: per sequence the summed KL
    and its position count), resampling whole units."""
    return percentile_interval(ratio_replicates(num, den, replicates, seed), level)
