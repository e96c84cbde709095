"""Evaluation task suites (configs/tasks/*.yaml) and their data files, checked before any model loads.

A suite: ``tasks:`` (a list) and optional ``include:`` (other suite files, relative to this one, or
shipped suites by name).
A task: ``name``, ``role`` (downstream | upstream), ``kind``, ``data`` (path relative to the suite file,
or ``builtin:digits/test.jsonl``), optional ``metric`` (the kind's default otherwise), ``prompt`` (a
template with {question}, {options}, {hint}), ``max_new_tokens``, ``limit``, ``image_folder``, ``answer_template`` (likelihood kinds: the
assistant text scored, e.g. "The answer is {answer}."), and for
``kind: drift`` the synthetic-text settings ``samples``, ``seq_len``, ``seed``.

A task evaluated by lmms-eval instead (``harness: lmms-eval``, or any task naming ``lmms_task`` under
``eval-forgetting --harness lmms-eval``): ``lmms_task`` (lmms-eval's task name, e.g. textvqa_val),
``metric`` (the key lmms-eval reports, e.g. exact_match), optional ``lmms_scale`` (100: the metric is a
fraction shown in percent; 1: already in its unit) and ``include_path`` (a folder of local lmms-eval task
YAMLs, relative to the suite file); ``data`` is then not needed."""
from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dowser_cli import metrics
from dowser_cli.artifacts import files_digest, sha256_file
from dowser_cli.config import find, load_yaml_file
from dowser_cli.data import load_image
from dowser_cli.errors import UserError
from dowser_cli.prepare import read_tsv


@dataclass(frozen=True)
class Kind:
    name: str
    metrics: tuple[str, ...]       # the first is the default
    prompt: str
    max_new_tokens: int = 16
    needs_data: bool = True


KINDS = {k.name: k for k in (
    Kind("vqa", ("vqa_accuracy", "exact_match", "contains"),
         "{question}\nAnswer the question using a single word or phrase.", 16),
    Kind("exact", ("exact_match", "contains"), "{question}", 32),
    Kind("choice", ("choice_accuracy",),
         "{hint}{question}\n{options}\nAnswer with the option's letter from the given choices directly.", 8),
    Kind("caption", ("cider",), "{question}", 32),
    Kind("likelihood", ("choice_likelihood", "answer_likelihood"), "{question}", 0),
    Kind("drift", ("kl",), "", 0, needs_data=False),
)}
ROLES = ("downstream", "upstream")
HARNESSES = ("dowser", "lmms-eval")
TASK_KEYS = {"name", "role", "kind", "data", "metric", "prompt", "max_new_tokens", "limit", "image_folder",
             "samples", "seq_len", "seed", "answer_template", "harness", "lmms_task", "lmms_scale", "include_path"}
# metrics in [0, 1] that the report shows in percent
PERCENT_METRICS = {"vqa_accuracy", "exact_match", "contains", "choice_accuracy", "cider", "choice_likelihood",
                   "answer_likelihood"}


@dataclass
class Task:
    name: str
    role: str
    kind: str
    metric: str
    prompt: str
    max_new_tokens: int
    data: Path | None = None
    image_folder: Path | None = None
    limit: int | None = None
    samples: int = 32
    seq_len: int = 64
    seed: int = 0
    answer_template: str = "{answer}"   # likelihood tasks: the assistant text scored for each answer
    harness: str = "dowser"           # who evaluates it: dowser's evaluator or lmms-eval
    lmms_task: str | None = None      # lmms-eval's task name (harness lmms-eval)
    lmms_scale: float = 100.0         # lmms-eval metrics are fractions: shown in percent unless 1
    include_path: Path | None = None  # local lmms-eval task YAMLs
    data_sha256: str | None = field(default=None, compare=False)
    include_sha256: str | None = field(default=None, compare=False)   # their contents: edits miss the cache

    def digest(self) -> str:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def scale(self) -> float:
        """Report unit per metric unit: 100 for fractions shown in percent."""
        if self.harness == "lmms-eval":
            return self.lmms_scale
        return 100.0 if self.metric in PERCENT_METRICS else 1.0

    @property
    def in_u(self) -> bool:
        """Counts towards U (drift is reported beside it, as a distance, not a score)."""
        return self.role == "upstream" and self.kind != "drift"


DATA_ROOT = "data"   # where `data-root:` paths point unless --data-root says otherwise (relative: to the cwd)


def resolve_data(spec: str, base: Path, data_root: Path | str = DATA_ROOT) -> Path:
    """``builtin:NAME/FILE`` (written to the cache on first use), ``data-root:REL`` (under the data
    root, where `dowser make-data` puts the paper's datasets), or a path relative to the suite file."""
    if spec.startswith("builtin:"):
        from dowser_cli import datasets

        return datasets.builtin(spec.removeprefix("builtin:"))
    if spec.startswith("data-root:"):
        return Path(data_root).expanduser() / spec.removeprefix("data-root:")
    p = Path(spec).expanduser()
    return p if p.is_absolute() else base / p


def load_suite(path: Path | str, _seen: tuple[Path, ...] = (), check_files: bool = True,
               data_root: Path | str = DATA_ROOT) -> list[Task]:
    """All tasks of a suite (a file, or a shipped suite's name; includes first, in order); unknown
    keys, kinds, metrics and (with ``check_files``) missing data files are one clear error naming the
    suite file and the task."""
    path = find(path, "tasks", "--tasks") if not _seen else Path(path)
    if path.resolve() in _seen:
        raise UserError(f"--tasks {path}: includes itself")
    data = load_yaml_file(path)
    tasks: list[Task] = []
    for inc in data.get("include") or []:   # beside the including file, else a shipped suite's name
        beside = path.parent / str(inc)
        target = beside if beside.is_file() else find(str(inc), "tasks", f"--tasks {path}: include")
        tasks += load_suite(target, _seen + (path.resolve(),), check_files, data_root)
    for i, raw in enumerate(data.get("tasks") or []):
        tasks.append(_task(raw, i, path, check_files, data_root))
    if not _seen:
        if not tasks:
            raise UserError(f"--tasks {path}: no tasks")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"--tasks {path}: task name(s) used twice: {', '.join(dup)}")
    return tasks


def check_complete(tasks: list[Task], path: Path) -> None:
    """A suite to report on (not a fragment meant for include:) needs both roles."""
    if not any(t.role == "downstream" for t in tasks) or not any(t.in_u for t in tasks):
        raise UserError(f"--tasks {path}: needs at least one downstream and one upstream (non-drift) task")


def _task(raw: Any, i: int, suite: Path, check_files: bool = True, data_root: Path | str = DATA_ROOT) -> Task:
    where = f"--tasks {suite}: task {i}"
    if not isinstance(raw, dict) or "name" not in raw:
        raise UserError(f"{where}: expected a mapping with a name")
    where = f"--tasks {suite}: task {raw['name']!r}"
    unknown = sorted(set(raw) - TASK_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TASK_KEYS))}")
    harness = raw.get("harness", "dowser")
    if harness not in HARNESSES:
        raise UserError(f"{where}: unknown harness {harness!r}; available: {', '.join(HARNESSES)}")
    if harness == "lmms-eval" or ("harness" not in raw and raw.get("lmms_task") and not raw.get("kind")):
        return _lmms_task(raw, where, suite)
    kind = KINDS.get(raw.get("kind", ""))
    if kind is None:
        raise UserError(f"{where}: unknown kind {raw.get('kind')!r}; available: {', '.join(KINDS)}")
    metric = raw.get("metric", kind.metrics[0])
    if metric not in kind.metrics:
        raise UserError(f"{where}: unknown metric {metric!r} for kind {kind.name}; available: {', '.join(kind.metrics)}")
    role = raw.get("role", "upstream")
    if role not in ROLES:
        raise UserError(f"{where}: role {role!r}: expected downstream or upstream")
    if kind.name == "drift" and role != "upstream":
        raise UserError(f"{where}: a drift entry measures what moved away from the base model: role upstream")
    data = folder = sha = None
    if kind.needs_data:
        if not raw.get("data"):
            raise UserError(f"{where}: no data file")
        spec = str(raw["data"])
        if not check_files and spec.startswith("builtin:"):
            spec = "/dev/null"  # validating structure only: do not materialise built-in data
        data = resolve_data(spec, suite.parent, data_root)
        if not check_files:
            return Task(name=str(raw["name"]), role=role, kind=kind.name, metric=metric,
                        prompt=raw.get("prompt", kind.prompt), max_new_tokens=0, data=data)
        if not data.is_file():
            raise UserError(f"{where}: data file {data} does not exist (see the suite's comments for where to get "
                            f"it; `dowser make-data` writes the paper's datasets under --data-root)")
        folder = resolve_data(str(raw["image_folder"]), suite.parent, data_root) if raw.get("image_folder") \
            else data.parent
        sha = _sha(data)
    t = Task(name=str(raw["name"]), role=role, kind=kind.name, metric=metric, prompt=raw.get("prompt", kind.prompt),
             max_new_tokens=int(raw.get("max_new_tokens", kind.max_new_tokens)), data=data, image_folder=folder,
             limit=_limit(raw, where), samples=int(raw.get("samples", 32)), seq_len=int(raw.get("seq_len", 64)),
             seed=int(raw.get("seed", 0)), answer_template=str(raw.get("answer_template", "{answer}")),
             lmms_task=str(raw["lmms_task"]) if raw.get("lmms_task") else None,
             lmms_scale=_scale(raw, where), data_sha256=sha, **_include_path(raw, suite, where))
    return t


def _limit(raw: dict, where: str) -> int | None:
    limit = raw.get("limit")
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UserError(f"{where}: limit {limit!r}: expected a positive whole number of items (or no limit)")
    return limit


def _scale(raw: dict, where: str) -> float:
    scale = raw.get("lmms_scale", 100)
    if scale not in (1, 100):
        raise UserError(f"{where}: lmms_scale {scale!r}: expected 100 (a fraction shown in percent) or 1")
    return float(scale)


def _include_path(raw: dict, suite: Path, where: str) -> dict[str, Any]:
    """include_path and a digest of the files under it (task YAMLs, their utils.py, data kept beside them)."""
    if not raw.get("include_path"):
        return {}
    p = resolve_data(str(raw["include_path"]), suite.parent)
    if not p.is_dir():
        raise UserError(f"{where}: include_path {p} is not a folder of lmms-eval task YAMLs")
    files = (x for x in p.rglob("*") if x.is_file() and "__pycache__" not in x.parts)
    return {"include_path": p, "include_sha256": files_digest(p, files)}


def _lmms_task(raw: dict, where: str, suite: Path) -> Task:
    """A task lmms-eval evaluates: its name and metric key there, no data file of ours."""
    if not raw.get("lmms_task"):
        raise UserError(f"{where}: harness lmms-eval needs lmms_task (lmms-eval's task name, e.g. textvqa_val)")
    role = raw.get("role", "upstream")
    if role not in ROLES:
        raise UserError(f"{where}: role {role!r}: expected downstream or upstream")
    extra = sorted(set(raw) & {"data", "kind", "prompt", "max_new_tokens", "image_folder", "answer_template",
                               "samples", "seq_len", "seed"})
    if extra:
        raise UserError(f"{where}: harness lmms-eval takes its data, prompt and generation settings from the "
                        f"lmms-eval task; drop {', '.join(extra)}")
    return Task(name=str(raw["name"]), role=role, kind="lmms", metric=str(raw.get("metric", "exact_match")),
                prompt="", max_new_tokens=0, limit=_limit(raw, where), harness="lmms-eval",
                lmms_task=str(raw["lmms_task"]), lmms_scale=_scale(raw, where), **_include_path(raw, suite, where))


def _sha(path: Path) -> str:

    return sha256_file(path)


# ---- records -----------------------------------------------------------------------------------------

@dataclass
class EvalRecord:
    id: str
    question: str
    answers: list[str]
    image: Any = None               # a Path, or a PIL image decoded from the data file (MMBench TSV)
    options: list[str] = field(default_factory=list)
    answer_index: int | None = None
    hint: str = ""

    def load_image(self):
        if self.image is None or not isinstance(self.image, Path):
            return self.image

        return load_image(self.image)


def read_records(task: Task) -> list[EvalRecord]:
    """The task's records (LLaVA evaluation JSONL / JSON list, or an MMBench-style TSV), up to ``limit``."""
    path = task.data
    try:
        if path.suffix == ".tsv":
            rows = read_tsv(path)[1]
        else:
            text = path.read_text(encoding="utf-8")
            rows = json.loads(text) if text.lstrip().startswith("[") else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"task {task.name}: {path}: not JSON/JSONL ({e})") from None
    out = []
    for i, r in enumerate(rows[: task.limit] if task.limit else rows):
        try:
            out.append(_record(r, i, task))
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"task {task.name}: {path}: record {i}: {e}") from None
    if not out:
        raise UserError(f"task {task.name}: {path}: no records")
    return out


def _answers(r: dict) -> list[str]:
    for key in ("answers", "captions", "references"):
        if key in r:
            vals = r[key]
            return [str(v["answer"]) if isinstance(v, dict) else str(v) for v in vals]
    if "answer" in r:
        return [str(r["answer"])]
    raise KeyError("no answer/answers field")


def _record(r: dict, i: int, task: Task) -> EvalRecord:
    question = r.get("text") or r.get("question") or r.get("prompt") or ""
    options = [str(o) for o in r["options"]] if "options" in r else \
        [str(r[c]) for c in metrics.LETTERS if c in r and str(r[c]).strip() not in ("", "nan")]
    image = r.get("image")
    if isinstance(image, str) and image:
        if len(image) > 512 and not image.lower().endswith((".jpg", ".jpeg", ".png")):  # base64 (MMBench TSV)
            from PIL import Image

            image = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
        else:
            image = Path(image) if Path(image).is_absolute() else task.image_folder / image
            if not image.is_file():
                raise ValueError(f"image {image} does not exist")
    else:
        image = None
    rec = EvalRecord(id=str(r.get("question_id", r.get("id", r.get("index", i)))), question=str(question),
                     answers=_answers(r), image=image, options=options, hint=str(r.get("hint") or "").strip())
    if task.kind == "choice" or task.metric == "choice_likelihood":
        if len(options) < 2:
            raise ValueError("a choice task needs 'options' (or A/B/C/D columns)")
        rec.answer_index = metrics.answer_index(rec.answers[0], options)
    return rec


def render_prompt(task: Task, rec: EvalRecord) -> str:
    opts = "\n".join(f"{metrics.LETTERS[i]}. {o}" for i, o in enumerate(rec.options))
    hint = f"Hint: {rec.hint}\n" if rec.hint else ""
    return task.prompt.format(question=rec.question, options=opts, hint=hint)
