"""`dowser eval-forgetting`: what fine-tuning gained (downstream D) and what it cost (upstream U), with
the paper's H = 2UD/(U+D) (DESIGN section 1), for the base model and every run, in one report.

setup (suite, base model, runs checked against it) -> evaluate each (model, task) not in the cache ->
report.yaml, report.md, report.png. Results are cached per (model identity, task, settings) under
OUT/cache, so adding one run to a report evaluates only that run."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from dowser_cli import artifacts, drift, harness, metrics, probing
from dowser_cli.artifacts import atomic_file
from dowser_cli.artifacts.runs import open_run
from dowser_cli.config import find, option
from dowser_cli.data import Encoder, image_inputs, pack_right, pad_id, prompt_ids
from dowser_cli.errors import UserError
from dowser_cli.models import LoadedModel, load_config, load_model, meta_model, resolve_source
from dowser_cli.models.runs import load_run
from dowser_cli.runtime import resolve_device, resolve_dtype
from dowser_cli.progress import progress_bar, stderr_console
from dowser_cli.scoring import spearman
from dowser_cli.tasks import HARNESSES, EvalRecord, Task, check_complete, load_suite, read_records, render_prompt



@dataclass
class EvalConfig:
    batch_size: int = option(8, "Prompts per generate/forward batch.")
    max_len: int = option(2048, "Longest prompt in tokens.")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    drift: bool = option(False, "Add a data-free drift column (KL to the base on probe text) if the suite has none.",
                         off="--no-drift")
    bootstrap: int = option(1000, "Replicates of the items' bootstrap behind every 95 % interval.")
    bootstrap_seed: int = option(0, "Seed of the bootstrap.")
    harness: str = option("dowser", "dowser | lmms-eval: lmms-eval (an optional extra) evaluates every task that "
                          "names an lmms_task; tasks with harness: lmms-eval always go to it.")
    data_root: str = option("data", "Where the suite's `data-root:` files are: the --out parent of `dowser make-data`.",
                            show="./data")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps({"max_len": self.max_len, "dtype": self.dtype}).encode()).hexdigest()[:12]


@dataclass
class Subject:
    """One model in the report: the base, a run directory, or an exported checkpoint directory."""

    label: str
    kind: str                  # base | run | export
    path: Path | None
    identity: str             # what the cache key uses: the weights, not the path
    method: str
    load: Callable[[], LoadedModel]


# ---- setup ------------------------------------------------------------------------------------------------

def _base_subject(spec: str, random_init: bool, dtype: torch.dtype, device: str) -> tuple[Subject, LoadedModel]:
    source = resolve_source(spec, random_init=random_init)
    lm = load_model(source, load_config(source), dtype, device)
    identity = f"base:{artifacts.model_fingerprint(lm.model)}:{artifacts.weights_digest(lm.model)}"
    return Subject(f"base ({spec})", "base", None, identity, "zero-shot", lambda: lm), lm


def _run_subjects(paths: list[Path], base: LoadedModel, base_identity: str, dtype: torch.dtype,
                  device: str) -> list[Subject]:

    out, labels = [], set()
    base_fp = {}
    for p in paths:
        label = p.name if p.name not in labels else str(p)
        labels.add(label)
        if (p / "run.yaml").exists() or (p / "checkpoint").exists():
            run = open_run(p)
            run_dtype = getattr(torch, run.sidecar["model"].get("dtype", "float32"))
            if run_dtype not in base_fp:
                base_fp[run_dtype] = artifacts.model_fingerprint(base.model, run_dtype)
            if run.meta["model_fingerprint"] != base_fp[run_dtype]:
                raise UserError(f"{p}: was fine-tuned from a different base model ({run.model_spec}) than "
                                f"--base {base.source.spec} (fingerprint mismatch)")
            if run_dtype == dtype and run.meta.get("weights_digest") != artifacts.weights_digest(base.model):
                raise UserError(f"{p}: was fine-tuned from different weights than --base {base.source.spec}")
            ident = f"run:{base_identity}:{artifacts.sha256_file(run.delta)}"
            out.append(Subject(label, "run", p, ident, run.sidecar.get("method", "?"),
                               lambda run=run: load_run(run, dtype, device, base=base.source.spec)))
        elif (p / "config.json").is_file():
            exp = p / "dowser_export.yaml"
            ident = f"export:{artifacts.read_yaml(exp).get('delta_sha256')}" if exp.exists() else \
                "export:" + hashlib.sha256(b"".join(artifacts.sha256_file(f).encode()
                                                    for f in sorted(p.glob("*.safetensors")))).hexdigest()
            src = resolve_source(str(p))
            out.append(Subject(label, "export", p, ident, "export",
                               lambda src=src: load_model(src, load_config(src), dtype, device)))
        else:
            raise UserError(f"{p}: neither a run directory (run.yaml) nor a save_pretrained checkpoint (config.json)")
    return out


def _drift_task(tasks: list[Task]) -> list[Task]:
    if any(t.kind == "drift" for t in tasks):
        return tasks
    return tasks + [Task(name="drift", role="upstream", kind="drift", metric="kl", prompt="", max_new_tokens=0)]


# ---- evaluation of one (model, task) --------------------------------------------------------------------

def _batches(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def _pad_left(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def _image_kwargs(lm: LoadedModel, images: list, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    px = image_inputs(lm.processor, [im for im in images if im is not None])
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in px.items()}


def _pad_id(lm: LoadedModel) -> int:
    return pad_id(lm.tokenizer)


@torch.no_grad()
def generate_answers(lm: LoadedModel, task: Task, recs: list[EvalRecord], batch_size: int, max_len: int,
                     device: str, dtype: torch.dtype, advance: Callable[[int], None]) -> list[str]:
    """Greedy answers, batched with left padding."""
    enc = Encoder(lm.tokenizer, lm.processor, max_len)
    answers = []
    for chunk in _batches(recs, batch_size):
        images = [r.load_image() for r in chunk]
        seqs = [prompt_ids(enc, render_prompt(task, r), im) for r, im in zip(chunk, images)]
        ids, mask = _pad_left(seqs, _pad_id(lm))
        kw = _image_kwargs(lm, images, device, dtype)
        if lm.adapter.sequence_kwargs is not None and kw:
            kw.update(lm.adapter.sequence_kwargs(lm.config, ids))
        out = lm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                max_new_tokens=task.max_new_tokens, pad_token_id=_pad_id(lm),
                                eos_token_id=lm.tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None,
                                **{k: v.to(device) for k, v in kw.items()})
        answers += [lm.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out[:, ids.shape[1]:].cpu()]
        advance(len(chunk))
    return answers


@torch.no_grad()
def answer_logprobs(lm: LoadedModel, task: Task, recs: list[EvalRecord], candidates: list[list[str]],
                    batch_size: int, max_len: int, device: str, dtype: torch.dtype,
                    advance: Callable[[int], None]) -> list[list[tuple[float, int]]]:
    """(summed log-probability, tokens) of each candidate answer after the record's prompt [rec][cand]."""
    enc = Encoder(lm.tokenizer, lm.processor, max_len)
    if all(r.image is None for r in recs):
        return _shared_prompt_logprobs(lm, task, recs, candidates, enc, batch_size, device, advance)
    flat = [(i, j) for i, cs in enumerate(candidates) for j in range(len(cs))]
    out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(cs) for cs in candidates]
    prompts: dict[int, tuple[list[int], Any]] = {}
    for chunk in _batches(flat, batch_size):
        seqs, starts, images = [], [], []
        for i, j in chunk:
            if i not in prompts:
                im = recs[i].load_image()
                prompts[i] = (prompt_ids(enc, render_prompt(task, recs[i]), im), im)
            p, im = prompts[i]
            a = lm.tokenizer(candidates[i][j], add_special_tokens=False)["input_ids"]
            seqs.append(p + a)
            starts.append(len(p))
            images.append(im)
        ids, mask = pack_right(seqs, _pad_id(lm))
        mask = mask.long()
        kw = _image_kwargs(lm, images, device, dtype)
        if lm.adapter.sequence_kwargs is not None and kw:
            kw.update(lm.adapter.sequence_kwargs(lm.config, ids))
        logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), **kw).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].to(device)[..., None])[..., 0].cpu()
        for b, ((i, j), s, st) in enumerate(zip(chunk, seqs, starts)):
            n = len(s) - st
            out[i][j] = (float(logp[b, st - 1:len(s) - 1].sum()), n)
        advance(len({i for i, _ in chunk}))
    return out


@torch.no_grad()
def _shared_prompt_logprobs(lm: LoadedModel, task: Task, recs: list[EvalRecord], candidates: list[list[str]],
                            enc: Encoder, batch_size: int, device: str,
                            advance: Callable[[int], None]) -> list[list[tuple[float, int]]]:
    """Text-only records: each prompt runs once and its key/value cache serves all its candidates
    (the same numbers as one sequence per candidate, at about a third of the compute for 4-way
    choices). Prompts are left-padded with explicit positions; candidates follow right-padded.
    A batch holds consecutive records with the same number of candidates, ~batch_size sequences."""
    pad = _pad_id(lm)
    out: list[list[tuple[float, int]]] = []
    groups: list[list[int]] = []
    for i, c in enumerate(candidates):
        g = groups[-1] if groups else None
        if g and len(candidates[g[0]]) == len(c) and (len(g) + 1) * len(c) <= max(batch_size, len(c)):
            g.append(i)
        else:
            groups.append([i])
    for idx in groups:
        n = len(candidates[idx[0]])
        prompts = [prompt_ids(enc, render_prompt(task, recs[i]), None) for i in idx]
        ids, mask = _pad_left(prompts, pad)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        res = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(res.logits[:, -1].float(), -1).cpu().repeat_interleave(n, 0)  # [R*n, V]
        cache = res.past_key_values  # the output's field keeps its name
        cache.batch_repeat_interleave(n)
        answers = [lm.tokenizer(c, add_special_tokens=False)["input_ids"] for i in idx for c in candidates[i]]
        width = max(len(a) for a in answers)
        a_ids = torch.full((len(answers), width), pad, dtype=torch.long)
        a_mask = torch.zeros_like(a_ids)
        for j, a in enumerate(answers):
            a_ids[j, :len(a)] = torch.tensor(a)
            a_mask[j, :len(a)] = 1
        p_mask = mask.repeat_interleave(n, 0)
        a_pos = p_mask.sum(-1, keepdim=True) + torch.arange(width)[None]
        logits = lm.model(input_ids=a_ids.to(device), attention_mask=torch.cat([p_mask, a_mask], -1).to(device),
                          position_ids=a_pos.to(device), cache=cache, use_cache=True).logits.float()
        logp = torch.log_softmax(logits, -1).cpu()                      # [R*n, width, V]: tokens 2.. of each
        for j, a in enumerate(answers):
            total = float(first[j, a[0]])
            if len(a) > 1:
                total += float(logp[j, torch.arange(len(a) - 1), torch.tensor(a[1:])].sum())
            if j % n == 0:
                out.append([])
            out[-1].append((total, len(a)))
        advance(len(idx))
    return out


class DriftText:
    """Synthetic probe text from the base model (as `dowser probe` makes it), generated once per report."""

    def __init__(self):
        self._cache: dict[str, list[list[int]]] = {}

    def get(self, base: LoadedModel, task: Task, device: str) -> list[list[int]]:
        key = f"{task.samples}:{task.seq_len}:{task.seed}"
        if key not in self._cache:
            self._cache[key] = drift.probe_texts(base, task.samples, task.seq_len, task.seed, device)
        return self._cache[key]


def score_task(lm: LoadedModel, base: LoadedModel, task: Task, recs: list[EvalRecord], cfg: EvalConfig,
               device: str, dtype: torch.dtype, drift_text: DriftText, advance) -> dict[str, Any]:
    """{"score", "n", "predictions"?} of one model on one task (score in the metric's own unit)."""
    if task.kind == "drift":
        if lm is base:
            advance(task.samples)
            return {"score": 0.0, "n": task.samples, "kl_sums": [0.0] * task.samples, "positions": [1] * task.samples}
        seqs = drift_text.get(base, task, device)
        sums, counts = drift.kl_per_sequence(base, lm, seqs, cfg.batch_size, device, advance)
        return {"score": sum(sums) / max(sum(counts), 1), "n": len(seqs), "kl_sums": sums, "positions": counts}
    if task.kind == "likelihood":
        cands = [[task.answer_template.format(answer=a) for a in (r.options if task.metric == "choice_likelihood"
                                                                 else r.answers[:1])] for r in recs]
        lps = answer_logprobs(lm, task, recs, cands, cfg.batch_size, cfg.max_len, device, dtype, advance)
        if task.metric == "choice_likelihood":
            # the option the model finds most probable as a whole (summed log-probability; the
            # template's shared words cancel out)
            per = [float(max(range(len(lp)), key=lambda j, lp=lp: lp[j][0]) == r.answer_index) for lp, r in zip(lps, recs)]
        else:  # geometric-mean probability per token of the reference answer
            per = [math.exp(lp[0][0] / max(lp[0][1], 1)) for lp in lps]
        return {"score": sum(per) / len(per), "n": len(per), "per_item": per}
    preds = generate_answers(lm, task, recs, cfg.batch_size, cfg.max_len, device, dtype, advance)
    if task.metric == "cider":
        score, by_id = metrics.cider_d({r.id: p for r, p in zip(recs, preds)}, {r.id: r.answers for r in recs})
        per = [by_id[r.id] for r in recs]
    else:
        fn = {"vqa_accuracy": lambda p, r: metrics.vqa_accuracy(p, r.answers),
              "exact_match": lambda p, r: metrics.exact_match(p, r.answers),
              "contains": lambda p, r: metrics.contains_match(p, r.answers),
              "choice_accuracy": lambda p, r: metrics.choice_accuracy(p, r.options, r.answer_index)}[task.metric]
        per = [fn(p, r) for p, r in zip(preds, recs)]
        score = sum(per) / len(recs)
    return {"score": score, "n": len(recs), "per_item": per,
            "predictions": [{"id": r.id, "prediction": p, "answers": r.answers[:3]} for r, p in zip(recs, preds)]}


# ---- cache ------------------------------------------------------------------------------------------------

def cache_key(subject: Subject, task: Task, cfg: EvalConfig) -> str:
    # "items": results hold per-item scores (the intervals need them); older cache entries do not.
    # Drift is measured on probe text sampled as the probe samples it: its settings are part of the key.
    extra = f"|drift:{_drift_sampling()}" if task.kind == "drift" else \
        f"|lmms-eval:{harness.version()}" if task.harness == "lmms-eval" else ""
    return hashlib.sha256(f"items|{subject.identity}|{task.digest()}|{task.data_sha256}|{cfg.digest()}{extra}"
                          .encode()).hexdigest()[:24]


def _drift_sampling() -> str:
    c = probing.ProbeConfig()
    return f"{c.temperature}:{c.top_p}:{c.top_k}:{c.repetition_penalty}:{c.suppress}:{c.prefix_len}"


def _cache_get(cache: Path, key: str) -> dict | None:
    f = cache / f"{key}.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def _cache_put(cache: Path, key: str, result: dict) -> None:

    cache.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache / f"{key}.json") as tmp:
        tmp.write_text(json.dumps(result))


# ---- the run ---------------------------------------------------------------------------------------------

def run(base_spec: str, run_paths: list[Path], suite: Path, out: Path, cfg: EvalConfig, random_init: bool = False,
        command: str = "") -> dict[str, Any]:
    with artifacts.output_lock(out, command):
        return _run(base_spec, run_paths, suite, out, cfg, random_init, command)


def _run(base_spec: str, run_paths: list[Path], suite: Path, out: Path, cfg: EvalConfig, random_init: bool,
         command: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    suite = find(suite, "tasks", "--tasks")    # a file, or a shipped suite's name
    tasks = _with_harness(load_suite(suite, data_root=cfg.data_root), cfg.harness, suite)
    check_complete(tasks, suite)
    if cfg.drift:
        tasks = _drift_task(tasks)
    _check_out(out)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    _check_runs_cheaply(base_spec, random_init, run_paths, dtype)
    if any(t.harness == "lmms-eval" for t in tasks):
        harness.check_tasks([t for t in tasks if t.harness == "lmms-eval"])      # before any model loads
    records = {t.name: read_records(t) for t in tasks if t.kind != "drift" and t.harness == "dowser"}
    base_subject, base = _base_subject(base_spec, random_init, dtype, device)
    if any(t.harness == "lmms-eval" for t in tasks):
        harness.wrapper_for(base)   # runs share the base's architecture: refuse before any work starts
    subjects = [base_subject] + _run_subjects(run_paths, base, base_subject.identity, dtype, device)
    cache = out / "cache"
    results: dict[str, dict[str, dict]] = {}
    hits = misses = 0
    drift_text = DriftText()
    console = stderr_console()
    with progress_bar(console) as bar:
        for s in subjects:
            results[s.label] = {}
            todo = []
            for t in tasks:
                got = _cache_get(cache, cache_key(s, t, cfg))
                if got is not None:
                    results[s.label][t.name] = got
                    hits += 1
                else:
                    todo.append(t)
            if not todo:
                continue
            lm = s.load()
            lmms = [t for t in todo if t.harness == "lmms-eval"]
            if lmms:
                wrapper = harness.wrapper_for(lm)
                task_bar = bar.add_task(f"{s.label}: lmms-eval {', '.join(t.name for t in lmms)}", total=None)
                with harness.checkpoint(lm, s.path if s.kind == "export" else None, out) as ckpt, \
                        harness.offloaded([lm.model, base.model]):
                    got = harness.evaluate(ckpt, wrapper, lmms, device, dtype)
                for t in lmms:
                    _cache_put(cache, cache_key(s, t, cfg), got[t.name])
                    results[s.label][t.name] = got[t.name]
                    misses += 1
                bar.remove_task(task_bar)
            for t in todo:
                if t.harness == "lmms-eval":
                    continue
                n = t.samples if t.kind == "drift" else len(records[t.name])
                task_bar = bar.add_task(f"{s.label}: {t.name}", total=n)
                try:
                    res = score_task(lm, base, t, records.get(t.name, []), cfg, device, dtype, drift_text,
                                     lambda k, tb=task_bar: bar.advance(tb, k))
                except ValueError as e:  # e.g. an image task on a text-only model
                    raise UserError(f"task {t.name} on {s.label}: {e}") from None
                _cache_put(cache, cache_key(s, t, cfg), res)
                results[s.label][t.name] = res
                misses += 1
            if lm is not base:
                del lm
    report = build_report(subjects, tasks, results, base_spec, suite, cfg, command)
    report["cache"] = {"hits": hits, "evaluated": misses}
    report["timings"] = {"total_s": round(time.perf_counter() - t0, 3)}
    write_report(out, report, tasks)
    return report


def _with_harness(tasks: list[Task], name: str, suite: Path) -> list[Task]:
    """--harness lmms-eval sends every task that names an lmms_task to lmms-eval."""
    if name not in HARNESSES:
        raise UserError(f"--harness {name}: unknown; available: {', '.join(HARNESSES)}")
    if name == "dowser":
        return tasks
    if not any(t.lmms_task for t in tasks):
        raise UserError(f"--harness lmms-eval: no task in {suite} names an lmms_task")
    return [replace(t, harness="lmms-eval", kind="lmms") if t.lmms_task else t for t in tasks]


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")


def _check_runs_cheaply(base_spec: str, random_init: bool, paths: list[Path], dtype: torch.dtype) -> None:
    """Fingerprints on a weightless copy of the base: a run of another model fails before anything loads."""

    source = resolve_source(base_spec, random_init=random_init)
    config = load_config(source)
    fps: dict[torch.dtype, str] = {}
    for p in paths:
        if not p.exists():
            raise UserError(f"{p}: no such run directory")
        if not (p / "run.yaml").exists() and not (p / "checkpoint").exists():
            continue
        run = open_run(p)
        rd = getattr(torch, run.sidecar["model"].get("dtype", "float32"))
        if rd not in fps:
            fps[rd] = artifacts.model_fingerprint(meta_model(source, config, rd))
        if run.meta["model_fingerprint"] != fps[rd]:
            raise UserError(f"{p}: was fine-tuned from a different base model ({run.model_spec}) than --base "
                            f"{base_spec} (fingerprint mismatch)")


def _display(task: Task, score: float) -> float:
    return round(100 * score, 2) if task.scale == 100 else float(f"{score:.4g}")


def build_report(subjects: list[Subject], tasks: list[Task], results: dict, base_spec: str, suite: Path,
                 cfg: EvalConfig, command: str) -> dict[str, Any]:
    down = [t for t in tasks if t.role == "downstream"]
    up = [t for t in tasks if t.in_u]
    drift = [t for t in tasks if t.kind == "drift"]
    rows = []
    for s in subjects:
        r = results[s.label]
        scores = {t.name: _display(t, r[t.name]["score"]) for t in tasks}
        d = sum(scores[t.name] for t in down) / len(down)
        u = sum(scores[t.name] for t in up) / len(up)
        rows.append({"model": s.label, "kind": s.kind, "method": s.method, "path": str(s.path) if s.path else None,
                     "D": round(d, 2), "U": round(u, 2), "H": round(metrics.h_score(u, d), 2), "scores": scores,
                     **({"drift": scores[drift[0].name]} if drift else {})})
    base_u = rows[0]["U"]
    for row in rows:
        row["dU"] = round(row["U"] - base_u, 2)
    for row, ci in zip(rows, _intervals(subjects, tasks, results, cfg)):
        row["ci95"] = ci
    report = {
        **artifacts.sidecar_header("dowser.report", command),
        "base": base_spec, "suite": str(suite),
        "tasks": [{"name": t.name, "role": t.role, "kind": t.kind, "metric": t.metric,
                   "data": str(t.data) if t.data else None, "data_sha256": t.data_sha256,
                   "unit": "%" if t.scale == 100 else "nats" if t.kind == "drift" else "",
                   **({"harness": t.harness, "lmms_task": t.lmms_task} if t.harness != "dowser" else {})} for t in tasks],
        "config": asdict(cfg),
        "intervals": {"level": 0.95, "method": "percentile bootstrap over each task's items (stratified by task), "
                      "the same draw for every model (ΔU paired); drift resamples probe sequences",
                      "replicates": cfg.bootstrap, "seed": cfg.bootstrap_seed},
        "items": {t.name: results[subjects[0].label][t.name]["n"] for t in tasks},
        "rows": rows,
    }
    lmms = [t for t in tasks if t.harness == "lmms-eval"]
    if lmms:
        report["harnesses"] = {"lmms-eval": {
            "version": harness.version(),
            "tasks": {t.name: {"lmms_task": t.lmms_task, "metric": results[subjects[0].label][t.name]["lmms"]["metric"],
                               "scale": t.scale, "include_path": str(t.include_path) if t.include_path else None}
                      for t in lmms}}}
    if drift and len(rows) > 2:
        report["drift_vs_dU"] = _drift_tracking(rows[1:])
    return report


def _intervals(subjects: list[Subject], tasks: list[Task], results: dict, cfg: EvalConfig) -> list[dict]:
    """Per model {task | D | U | H | dU | drift: [lo, hi]} in the report's units (percent, nats)."""
    down = [t.name for t in tasks if t.role == "downstream"]
    up = [t.name for t in tasks if t.in_u]
    items = {}
    for t in tasks:
        if t.kind == "drift":
            continue
        per = [results[s.label][t.name]["per_item"] for s in subjects]
        scale = t.scale
        items[t.name] = torch.tensor(per, dtype=torch.float64) * scale
    cis = metrics.bootstrap_report(items, down, up, cfg.bootstrap, cfg.bootstrap_seed)
    out = []
    for s, ci in zip(subjects, cis):
        row = {k: [round(lo, 2), round(hi, 2)] for k, (lo, hi) in ci.items()}
        for t in tasks:
            if t.kind == "drift":
                r = results[s.label][t.name]
                lo, hi = metrics.ratio_interval(torch.tensor(r["kl_sums"]), torch.tensor(r["positions"]),
                                                cfg.bootstrap, cfg.bootstrap_seed)
                row[t.name] = [float(f"{lo:.4g}"), float(f"{hi:.4g}")]
        out.append(row)
    return out


def _drift_tracking(rows: list[dict]) -> dict[str, float]:
    """How well the data-free drift ranks the runs' upstream loss: Spearman of drift against -dU."""

    x = torch.tensor([r["drift"] for r in rows], dtype=torch.float64)
    y = torch.tensor([-r["dU"] for r in rows], dtype=torch.float64)
    return {"runs": len(rows), "spearman": round(float(spearman(x, y)), 4)}


def render_markdown(report: dict, tasks: list[Task]) -> str:
    down = [t.name for t in tasks if t.role == "downstream"]
    up = [t.name for t in tasks if t.in_u]
    drift = [t.name for t in tasks if t.kind == "drift"]
    head = ["model", "method", *[f"D: {n}" for n in down], "D", *[f"U: {n}" for n in up], "U", "H", "ΔU",
            *(["drift (KL)"] if drift else [])]
    iv = report.get("intervals", {})
    sizes = ", ".join(f"{n} {k}" for n, k in report.get("items", {}).items())
    lines = [f"# Forgetting report: base {report['base']}", "",
             f"Suite `{report['suite']}`; scores in % (CIDEr x100); U = mean of the upstream tasks, "
             f"H = 2UD/(U+D); ΔU against the base model." + (" Drift: mean KL(base || model) of next-token "
                                                              "distributions on synthetic probe text." if drift else ""),
             f"Each score is followed by its 95 % interval [lo, hi]: a percentile bootstrap over the items "
             f"({iv.get('replicates', '?')} replicates, seed {iv.get('seed', '?')}; ΔU paired with the base's "
             f"items). Items: {sizes}.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        ci = r.get("ci95", {})

        def cell(value: float, key: str, fmt: str = ".2f") -> str:
            lo_hi = ci.get(key)
            return f"{value:{fmt}} [{lo_hi[0]:{fmt}}, {lo_hi[1]:{fmt}}]" if lo_hi else f"{value:{fmt}}"

        cells = [r["model"], r["method"], *[cell(r["scores"][n], n) for n in down], cell(r["D"], "D"),
                 *[cell(r["scores"][n], n) for n in up], cell(r["U"], "U"), cell(r["H"], "H"),
                 cell(r["dU"], "dU", "+.2f"), *([cell(r["drift"], drift[0], ".3g")] if drift else [])]
        lines.append("| " + " | ".join(cells) + " |")
    if "drift_vs_dU" in report:
        d = report["drift_vs_dU"]
        lines += ["", f"Drift against upstream loss over {d['runs']} runs: Spearman {d['spearman']:+.2f} "
                      f"(+1: drift ranks the runs exactly as their loss of U)."]
    return "\n".join(lines) + "\n"


def write_chart(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for r in report["rows"]:
        base = r["kind"] == "base"
        ci = r.get("ci95", {})
        if "D" in ci:  # 95 % intervals as error bars
            ax.errorbar(r["D"], r["U"], xerr=[[r["D"] - ci["D"][0]], [ci["D"][1] - r["D"]]],
                        yerr=[[r["U"] - ci["U"][0]], [ci["U"][1] - r["U"]]], fmt="none", alpha=0.5, zorder=2)
        ax.scatter(r["D"], r["U"], s=80 if base else 50, marker="*" if base else "o", zorder=3)
        ax.annotate(f"{r['model']} (H {r['H']:.1f})", (r["D"], r["U"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xlabel("downstream D (learnt)")
    ax.set_ylabel("upstream U (kept)")
    ax.set_title(f"Forgetting: {report['base']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(out: Path, report: dict, tasks: list[Task]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_yaml(out / "report.yaml", report)

    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(render_markdown(report, tasks))
    write_chart(out / "report.png", report)
