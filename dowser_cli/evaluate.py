"""`dowser eval-forgetting`: what fine-tuning gained (downstream D) and what it cost (upstream U), with
the paper's H = 2UD/(U+D) (DESIGN section 1), for the base model and every run, in one report.

setup (suite, base model, runs checked against it) -> evaluate each (model, task) not in the cache ->
report.yaml, report.md, report.png. Results are cached per (model identity, task, settings) under
OUT/cache, so adding one run to a report evaluates only that run."""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from dowser_cli import artifacts, drift, harness, metrics, probing
from dowser_cli.artifacts import atomic_file
from dowser_cli.artifacts.runs import open_run, snapshot_steps, split_spec
from dowser_cli.config import find, option
from dowser_cli.data import Encoder, image_inputs, pack_right, pad_id, prompt_ids
from dowser_cli.errors import UserError
from dowser_cli.models import LoadedModel, load_config, load_model, meta_model, resolve_source
from dowser_cli.models.runs import digest_dtype, load_run
from dowser_cli.runtime import resolve_device, resolve_dtype
from dowser_cli.progress import progress_bar, stderr_console
from dowser_cli.resources import peak_memory
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
    snapshots: bool = option(False, "Also evaluate every snapshot of each run (finetune --snapshot-every): "
                             "forgetting curves of D, U, H and drift against steps (report-curves.png).",
                             off="--no-snapshots")
    reference: str = option("", "Compare every run with this one: a run's name (dowser-s0), or a method over seeds "
                            "(dowser: runs named dowser-s<N>, each paired with the same seed and step): ΔD, ΔU, ΔH, "
                            "Δdrift with paired bootstrap intervals (same items, same resamples), per seed and "
                            "pooled.", show="none")

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
    run: str = ""             # the run's name (a snapshot's run; the label without @STEP)
    step: int | None = None   # optimiser steps behind these weights (a snapshot's, or a finished run's)


# ---- setup ------------------------------------------------------------------------------------------------

def _base_subject(spec: str, random_init: bool, dtype: torch.dtype, device: str) -> tuple[Subject, LoadedModel]:
    source = resolve_source(spec, random_init=random_init)
    lm = load_model(source, load_config(source), dtype, device)
    identity = f"base:{artifacts.model_fingerprint(lm.model)}:{artifacts.weights_digest(lm.model)}"
    return Subject(f"base ({spec})", "base", None, identity, "zero-shot", lambda: lm), lm


def expand_specs(paths: list[Path], snapshots: bool) -> list[tuple[Path, int | None]]:
    """The models to evaluate: each run directory (RUN, or RUN@STEP for its snapshot at STEP); with
    ``snapshots`` every snapshot of each run too, in step order, then the run itself when finished."""
    out = []
    for spec in paths:
        path, step = split_spec(spec)
        if step is None and snapshots and path.is_dir():
            out += [(path, s) for s in snapshot_steps(path)]
            if (path / "run.yaml").exists() or (path / "config.json").exists() or not snapshot_steps(path):
                out.append((path, None))
        else:
            out.append((path, step))
    return out


def final_step(sidecar: dict) -> int | None:
    """The step whose weights a finished run holds (--max-drift: the snapshot it kept)."""
    stopped = sidecar.get("max_drift") or {}
    return stopped.get("kept_step", sidecar.get("steps"))


def _run_subjects(specs: list[tuple[Path, int | None]], base: LoadedModel, base_identity: str, dtype: torch.dtype,
                  device: str) -> list[Subject]:

    out, owner = [], {}
    base_fp = {}
    for p, step in specs:
        name = p.name if owner.setdefault(p.name, p) == p else str(p)   # two runs of one name: their paths
        label = name if step is None else f"{name}@{step}"
        if step is not None or (p / "run.yaml").exists() or (p / "checkpoint").exists():
            run = open_run(p, step)
            run_dtype = getattr(torch, run.sidecar["model"].get("dtype", "float32"))
            if run_dtype not in base_fp:
                base_fp[run_dtype] = artifacts.model_fingerprint(base.model, run_dtype)
            if run.meta["model_fingerprint"] != base_fp[run_dtype]:
                raise UserError(f"{p}: was fine-tuned from a different base model ({run.model_spec}) than "
                                f"--base {base.source.spec} (fingerprint mismatch)")
            if digest_dtype(run.sidecar) == dtype and run.meta.get("weights_digest") != artifacts.weights_digest(base.model):
                raise UserError(f"{p}: was fine-tuned from different weights than --base {base.source.spec}")
            ident = f"run:{base_identity}:{artifacts.sha256_file(run.delta)}"
            out.append(Subject(label, "run", p, ident, run.sidecar.get("method", "?"),
                               lambda run=run: load_run(run, dtype, device, base=base.source.spec), name,
                               step if step is not None else final_step(run.sidecar)))
        elif (p / "config.json").is_file():
            exp = p / "dowser_export.yaml"
            ident = f"export:{artifacts.read_yaml(exp).get('delta_sha256')}" if exp.exists() else \
                "export:" + hashlib.sha256(b"".join(artifacts.sha256_file(f).encode()
                                                    for f in sorted(p.glob("*.safetensors")))).hexdigest()
            src = resolve_source(str(p))
            out.append(Subject(label, "export", p, ident, "export",
                               lambda src=src: load_model(src, load_config(src), dtype, device), name))
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
    enc = Encoder(lm.tokenizer, lm.processor, max_len, lm.stop_ids())
    answers, stop = [], lm.stop_ids() or None
    for chunk in _batches(recs, batch_size):
        images = [r.load_image() for r in chunk]
        seqs = [prompt_ids(enc, render_prompt(task, r), im) for r, im in zip(chunk, images)]
        ids, mask = _pad_left(seqs, _pad_id(lm))
        kw = _image_kwargs(lm, images, device, dtype)
        if lm.adapter.sequence_kwargs is not None and kw:
            kw.update(lm.adapter.sequence_kwargs(lm.config, ids))
        out = lm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                max_new_tokens=task.max_new_tokens, pad_token_id=_pad_id(lm),
                                eos_token_id=stop, temperature=None, top_p=None, top_k=None,
                                **{k: v.to(device) for k, v in kw.items()})
        answers += [lm.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out[:, ids.shape[1]:].cpu()]
        advance(len(chunk))
    return answers


@torch.no_grad()
def answer_logprobs(lm: LoadedModel, task: Task, recs: list[EvalRecord], candidates: list[list[str]],
                    batch_size: int, max_len: int, device: str, dtype: torch.dtype,
                    advance: Callable[[int], None]) -> list[list[tuple[float, int]]]:
    """(summed log-probability, tokens) of each candidate answer after the record's prompt [rec][cand]."""
    enc = Encoder(lm.tokenizer, lm.processor, max_len, lm.stop_ids())
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

def cache_key(subject: Subject, task: Task, cfg: EvalConfig, stop: str = "") -> str:
    # "items": results hold per-item scores (the intervals need them); older cache entries do not.
    # Drift is measured on probe text sampled as the probe samples it: its settings are part of the key.
    extra = f"|drift:{_drift_sampling()}" if task.kind == "drift" else \
        f"|lmms-eval:{harness.version()}" if task.harness == "lmms-eval" else ""
    if stop and task.harness == "dowser" and task.kind not in ("drift", "likelihood"):
        extra += f"|stop:{stop}"   # answers that stop on more than the tokenizer's EOS
    return hashlib.sha256(f"items|{subject.identity}|{task.digest()}|{task.data_sha256}|{cfg.digest()}{extra}"
                          .encode()).hexdigest()[:24]


def stop_key(lm: LoadedModel) -> str:
    """The answers' stop ids where they are more than the tokenizer's EOS, else "" (the cache keys of
    entries made before generation stopped on the generation config's ids stay valid)."""
    ids = lm.stop_ids()
    return "" if ids in ([], [getattr(lm.tokenizer, "eos_token_id", None)]) else ",".join(map(str, ids))


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
    specs = expand_specs(run_paths, cfg.snapshots)
    if cfg.reference:
        check_reference(cfg.reference, sorted({p.name for p, _ in specs}))
    _check_runs_cheaply(base_spec, random_init, specs, dtype)
    if any(t.harness == "lmms-eval" for t in tasks):
        harness.check_tasks([t for t in tasks if t.harness == "lmms-eval"])      # before any model loads
    records = {t.name: read_records(t) for t in tasks if t.kind != "drift" and t.harness == "dowser"}
    base_subject, base = _base_subject(base_spec, random_init, dtype, device)
    if any(t.harness == "lmms-eval" for t in tasks):
        harness.wrapper_for(base)   # runs share the base's architecture: refuse before any work starts
    subjects = [base_subject] + _run_subjects(specs, base, base_subject.identity, dtype, device)
    stop = stop_key(base)
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
                got = _cache_get(cache, cache_key(s, t, cfg, stop))
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
                    _cache_put(cache, cache_key(s, t, cfg, stop), got[t.name])
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
                _cache_put(cache, cache_key(s, t, cfg, stop), res)
                results[s.label][t.name] = res
                misses += 1
            if lm is not base:
                del lm
    report = build_report(subjects, tasks, results, base_spec, suite, cfg, command)
    report["cache"] = {"hits": hits, "evaluated": misses}
    report["generation"] = {"stop_token_ids": base.stop_ids(),
                            "from": "the base's generation_config.eos_token_id and its tokenizer's eos_token_id"}
    report["timings"] = {"total_s": round(time.perf_counter() - t0, 3)}
    # this process's peaks (lmms-eval's copy of a model included: it loads in this process)
    report["peak_memory"] = peak_memory(device)
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


def _check_runs_cheaply(base_spec: str, random_init: bool, specs: list[tuple[Path, int | None]],
                        dtype: torch.dtype) -> None:
    """Fingerprints on a weightless copy of the base: a run of another model fails before anything loads."""

    source = resolve_source(base_spec, random_init=random_init)
    config = load_config(source)
    fps: dict[torch.dtype, str] = {}
    for p, step in specs:
        if not p.exists():
            raise UserError(f"{p}: no such run directory")
        if step is None and not (p / "run.yaml").exists() and not (p / "checkpoint").exists():
            continue
        run = open_run(p, step)
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
                     **({"run": s.run, "step": s.step} if s.kind == "run" else {}),
                     "D": round(d, 2), "U": round(u, 2), "H": round(metrics.h_score(u, d), 2), "scores": scores,
                     **({"drift": scores[drift[0].name]} if drift else {})})
    base_u = rows[0]["U"]
    for row in rows:
        row["dU"] = round(row["U"] - base_u, 2)
    reps = _replicates(subjects, tasks, results, cfg)
    for row, ci in zip(rows, _intervals(reps, {t.name for t in drift})):
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
        report["drift_vs_dU"] = _drift_tracking(distinct(rows[1:]), cfg)
    if cfg.reference:
        report["paired"] = paired_report(rows, reps, cfg.reference, drift[0].name if drift else None)
    return report


def _replicates(subjects: list[Subject], tasks: list[Task], results: dict, cfg: EvalConfig) -> dict[str, torch.Tensor]:
    """Bootstrap replicates [models, R] in the report's units (percent, nats) of every task, D, U, H, ΔU
    and drift: one draw of items (and of drift sequences) for all models, so differences are paired."""
    down = [t.name for t in tasks if t.role == "downstream"]
    up = [t.name for t in tasks if t.in_u]
    items = {t.name: torch.tensor([results[s.label][t.name]["per_item"] for s in subjects], dtype=torch.float64)
             * t.scale for t in tasks if t.kind != "drift"}
    reps = metrics.bootstrap_replicates(items, down, up, cfg.bootstrap, cfg.bootstrap_seed)
    for t in tasks:
        if t.kind == "drift":
            num = torch.tensor([results[s.label][t.name]["kl_sums"] for s in subjects], dtype=torch.float64)
            den = torch.tensor([results[s.label][t.name]["positions"] for s in subjects], dtype=torch.float64)
            reps[t.name] = metrics.ratio_replicates(num, den, cfg.bootstrap, cfg.bootstrap_seed)
    return reps


def _intervals(reps: dict[str, torch.Tensor], drift: set[str]) -> list[dict]:
    """Per model {task | D | U | H | dU | drift: [lo, hi]}: 95 % percentile intervals of the replicates
    (``drift``: the drift tasks' names, in nats to 4 significant digits)."""
    out = []
    for m in range(next(iter(reps.values())).shape[0]):
        row = {}
        for k, v in reps.items():
            row[k] = _round_ci("drift" if k in drift else k, metrics.percentile_interval(v[m]))
        out.append(row)
    return out


_SEEDED = re.compile(r"(?P<group>.+)-s(?P<seed>\d+)")


def _group_seed(run: str) -> tuple[str, int | None]:
    m = _SEEDED.fullmatch(run)
    return (m.group("group"), int(m.group("seed"))) if m else (run, None)


def paired_report(rows: list[dict], reps: dict[str, torch.Tensor], reference: str,
                  drift: str | None = None) -> dict[str, Any]:
    """Every run against ``reference`` (a run's name, or a method group over seeds: runs named
    GROUP-s<N>), at the same step and, for a group, the same seed: the differences ΔD, ΔU, ΔH and Δdrift
    (run - reference) with paired bootstrap intervals; and pooled over seeds per (method, step), the
    mean difference with its interval over the same resamples (items' noise; the seeds' spread beside)."""
    runs = [(i, r) for i, r in enumerate(rows) if r["kind"] == "run"]
    refs = {}
    for i, r in runs:
        group, seed = _group_seed(r["run"])
        if r["run"] == reference:
            refs[("*", r["step"])] = i
        elif group == reference:
            refs[(seed, r["step"])] = i
    if not refs:
        check_reference(reference, [r["run"] for _, r in runs])
    reps = {**reps, **({"drift": reps[drift]} if drift else {})}   # the drift task's replicates, as rows name it
    keys = [k for k in ("D", "U", "H", "drift") if k in reps]
    pairs, pooled = [], {}
    for i, r in runs:
        group, seed = _group_seed(r["run"])
        if group == reference or r["run"] == reference:
            continue
        j = refs.get(("*", r["step"]), refs.get((seed, r["step"])))
        if j is None:
            continue
        diff = {f"d{k}": _diff(rows[i], rows[j], k) for k in keys}
        ci = {f"d{k}": _round_ci(k, metrics.paired_difference(reps[k], [(i, j)])) for k in keys}
        pairs.append({"model": r["model"], "reference": rows[j]["model"], "step": r["step"], "seed": seed,
                      **diff, "ci95": ci})
        by_seed = pooled.setdefault((group, r["step"]), {})
        if seed not in by_seed or "@" not in r["model"]:
            by_seed[seed] = (i, j)   # a finished run and its last snapshot are one state: counted once
    out = []
    for (group, step), seeds in pooled.items():
        ij = [(i, j, seed) for seed, (i, j) in seeds.items()]
        idx = [(i, j) for i, j, _ in ij]
        point = {f"d{k}": _round(k, sum(_diff(rows[i], rows[j], k) for i, j in idx) / len(idx)) for k in keys}
        spread = {f"d{k}": [_diff(rows[i], rows[j], k) for i, j in idx] for k in keys}
        out.append({"group": group, "step": step, "seeds": [s for _, _, s in ij], **point,
                    "ci95": {f"d{k}": _round_ci(k, metrics.paired_difference(reps[k], idx)) for k in keys},
                    "per_seed": spread})
    return {"reference": reference, "level": 0.95,
            "method": "paired percentile bootstrap: the same resampled items (drift: probe sequences) for a run and "
                      "its reference; pooled = the mean difference over seeds, on the same resamples",
            "pairs": pairs, "pooled": out}


def check_reference(reference: str, runs: list[str]) -> None:
    """--reference names one of the runs, or the method of seeded runs (GROUP-s<N>)."""
    names = sorted(set(runs) | {_group_seed(r)[0] for r in runs})
    if reference not in names:
        raise UserError(f"--reference {reference}: no such run or method among the runs; names: {', '.join(names)}")


def _diff(row: dict, ref: dict, key: str) -> float:
    return _round(key, row[key] - ref[key])


def _round(key: str, x: float) -> float:
    return float(f"{x:.4g}") if key == "drift" else round(x, 2)


def _round_ci(key: str, ci: tuple[float, float]) -> list[float]:
    return [_round(key, ci[0]), _round(key, ci[1])]


def _drift_tracking(rows: list[dict], cfg: EvalConfig) -> dict[str, Any]:
    """How well the data-free drift ranks the models' upstream loss: Spearman of drift against -ΔU over
    every run and snapshot, with a 95 % interval from resampling the models."""

    x = torch.tensor([r["drift"] for r in rows], dtype=torch.float64)
    y = torch.tensor([-r["dU"] for r in rows], dtype=torch.float64)
    out: dict[str, Any] = {"runs": len(rows), "spearman": round(float(spearman(x, y)), 4)}
    if len(rows) >= 4:
        idx = metrics.bootstrap_indices(len(rows), cfg.bootstrap, cfg.bootstrap_seed)
        vals = torch.tensor([spearman(x[i], y[i]) for i in idx], dtype=torch.float64)
        vals = vals[~vals.isnan()]
        if len(vals):
            lo, hi = metrics.percentile_interval(vals)
            out["ci95"] = [round(lo, 4), round(hi, 4)]
    return out


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
        ci = f" [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if "ci95" in d else ""
        lines += ["", f"Drift against upstream loss over {d['runs']} runs and snapshots: Spearman {d['spearman']:+.2f}"
                      f"{ci} (+1: drift ranks them exactly as their loss of U; interval: the models resampled)."]
    lines += _curves_markdown(report)
    lines += _paired_markdown(report)
    return "\n".join(lines) + "\n"


def distinct(rows: list[dict]) -> list[dict]:
    """The rows without a snapshot whose run's end is the same step (the same weights, listed once)."""
    ends = {(r["run"], r["step"]) for r in rows if r.get("step") is not None and "@" not in r["model"]}
    return [r for r in rows if not ("@" in r["model"] and (r.get("run"), r.get("step")) in ends)]


def curves(report: dict) -> dict[str, list[dict]]:
    """Rows of runs evaluated at more than one step, per run, in step order."""
    out: dict[str, list[dict]] = {}
    for r in distinct(report["rows"]):
        if r.get("step") is not None:
            out.setdefault(r["run"], []).append(r)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in out.items() if len(v) > 1}


def _fmt(value: float, ci: list[float] | None, fmt: str) -> str:
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else f"{value:{fmt}}"


def _curves_markdown(report: dict) -> list[str]:
    c = curves(report)
    if not c:
        return []
    has_drift = any("drift" in r for rs in c.values() for r in rs)
    drift_key = next((t["name"] for t in report["tasks"] if t["kind"] == "drift"), None)
    lines = ["", "## Forgetting curves", "", "Each run at each of its snapshots (finetune --snapshot-every) and at "
             "its end; the chart is report-curves.png.", "",
             "| run | step | D | U | H | ΔU |" + (" drift (KL) |" if has_drift else ""),
             "|---|---|---|---|---|---|" + ("---|" if has_drift else "")]
    for run, rs in c.items():
        for r in rs:
            ci = r.get("ci95", {})
            lines.append(f"| {run} | {r['step']} | {_fmt(r['D'], ci.get('D'), '.2f')} | {_fmt(r['U'], ci.get('U'), '.2f')} "
                         f"| {_fmt(r['H'], ci.get('H'), '.2f')} | {_fmt(r['dU'], ci.get('dU'), '+.2f')} |"
                         + (f" {_fmt(r['drift'], ci.get(drift_key), '.4f')} |" if has_drift else ""))
    return lines


def _paired_markdown(report: dict) -> list[str]:
    p = report.get("paired")
    if not p:
        return []
    keys = [k for k in ("dD", "dU", "dH", "ddrift") if any(k in x for x in p["pairs"] + p["pooled"])]
    head = {"dD": "ΔD", "dU": "ΔU", "dH": "ΔH", "ddrift": "Δdrift"}

    def cells(x: dict) -> str:
        return " | ".join(_fmt(x[k], x["ci95"].get(k), "+.4f" if k == "ddrift" else "+.2f") for k in keys)

    lines = ["", f"## Paired against {p['reference']}", "",
             "Run minus reference, at the same step (and seed); 95 % paired bootstrap intervals (the same resampled "
             "items for both). An interval that excludes 0 is a difference beyond the items' noise.", "",
             "| run | reference | step | " + " | ".join(head[k] for k in keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    lines += [f"| {x['model']} | {x['reference']} | {x['step']} | {cells(x)} |" for x in p["pairs"]]
    if any(len(x["seeds"]) > 1 for x in p["pooled"]):
        lines += ["", "Pooled over seeds: the mean difference and its interval over the same resamples (item "
                      "noise); the per-seed differences beside show the seeds' spread.", "",
                  "| method | step | seeds | " + " | ".join(head[k] for k in keys) + " | ΔU per seed |",
                  "|---|---|---|" + "---|" * (len(keys) + 1)]
        lines += [f"| {x['group']} | {x['step']} | {','.join(str(s) for s in x['seeds'])} | {cells(x)} | "
                  f"{', '.join(f'{v:+.2f}' for v in x['per_seed'].get('dU', []))} |" for x in p["pooled"]]
    return lines


def write_curves_chart(path: Path, report: dict) -> None:
    """D, U and drift against steps, one line per run (a colour per method, seeds alike), with their
    95 % intervals as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curves(report)
    drift_key = next((t["name"] for t in report["tasks"] if t["kind"] == "drift"), None)
    panels = [("U", "upstream U (kept)"), ("D", "downstream D (learnt)")] + \
        ([("drift", "drift KL(base || model)")] if drift_key else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=120)
    colours: dict[str, Any] = {}
    base_u = report["rows"][0]["U"]
    for run, rs in c.items():
        group = _group_seed(run)[0]
        colour = colours.setdefault(group, f"C{len(colours) % 10}")
        steps = [r["step"] for r in rs]
        for ax, (key, _) in zip(axes, panels):
            ci_key = drift_key if key == "drift" else key
            ys = [r[key] for r in rs]
            ax.plot(steps, ys, marker="o", color=colour, label=group if run == next(
                k for k in c if _group_seed(k)[0] == group) else None)
            cis = [r.get("ci95", {}).get(ci_key) for r in rs]
            if all(cis):
                ax.fill_between(steps, [x[0] for x in cis], [x[1] for x in cis], color=colour, alpha=0.15)
    for ax, (key, title) in zip(axes, panels):
        if key == "U":
            ax.axhline(base_u, color="k", lw=0.8, ls="--", label="base")
        if all(r["step"] > 0 for rs in c.values() for r in rs):
            ax.set_xscale("log", base=2)
        else:   # a step-0 snapshot (--max-drift's fallback, the base)
            ax.set_xscale("symlog", base=2, linthresh=1)
        ax.set_xlabel("optimiser steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Forgetting curves: {report['base']}")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


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
    if curves(report):
        write_curves_chart(out / "report-curves.png", report)
