"""lmms-eval as a second evaluator for `dowser eval-forgetting` (tasks with ``harness: lmms-eval``).

Each model is handed to lmms-eval as a save_pretrained directory (an exported checkpoint as it is; the
base model and run directories written to a temporary directory under the report's folder and removed
afterwards), through the model wrapper the architecture adapter names (``Adapter.lmms_wrappers``).
lmms-eval computes the metric; its per-sample values give the items' bootstrap intervals like any other
task's. lmms-eval is an optional extra: nothing here imports it until a task needs it."""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import inspect
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch

from dowser_cli.data import Encoder
from dowser_cli.errors import UserError, first_line
from dowser_cli.models import LoadedModel, registry
from dowser_cli.models.chat import FALLBACK_LIST_TEMPLATE, IMAGE_PLACEHOLDER, accepting_parts
from dowser_cli.tasks import Task

INSTALL = "make install-lmms (keeps the torch build make install chose), or pip install -e \".[lmms]\""


def version() -> str | None:
    try:
        return metadata.version("lmms-eval")
    except metadata.PackageNotFoundError:
        return None


def require() -> str:
    """lmms-eval's version, or one line saying how to install it."""
    v = version()
    try:
        importlib.import_module("lmms_eval.evaluator")   # importable, not only installed
    except ImportError as e:
        what = "is not installed" if v is None else f"does not import ({e})"
        raise UserError(f"harness lmms-eval: lmms-eval {what}; install the extra: {INSTALL}") from None
    _log_to_stderr()
    return v or "?"


@functools.cache   # once: later calls would remove sinks the user has added since
def _log_to_stderr() -> None:
    """Importing lmms_eval.models replaces loguru's sinks with one on the real stdout object (which
    redirect_stdout cannot reach): its warnings would land in `--json` output. Send them to stderr."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


@functools.lru_cache(maxsize=4)
def _manager(includes: tuple[str, ...]):
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="WARNING", include_path=list(includes) or None)


def check_tasks(tasks: list[Task]):
    """lmms-eval's TaskManager for these tasks (their include_paths indexed), or one line naming the
    task names lmms-eval does not know: checked before any model loads."""
    v = require()
    manager = _manager(tuple(sorted({str(t.include_path) for t in tasks if t.include_path is not None})))
    unknown = sorted({t.lmms_task for t in tasks} - set(manager.all_tasks))
    if unknown:
        raise UserError(f"harness lmms-eval: unknown lmms-eval task(s) {', '.join(unknown)} "
                        f"(lmms-eval {v}; `python -m lmms_eval --tasks list` lists them; local YAMLs need include_path)")
    return manager


def wrapper_for(lm: LoadedModel) -> str:
    model_type = getattr(lm.config, "model_type", None)
    wrapper = lm.adapter.lmms_wrappers.get(model_type)
    if wrapper is None:
        known = sorted(f"{mt} ({w})" for mt, w in registry.lmms_wrappers().items())
        raise UserError(f"harness lmms-eval: no lmms-eval model wrapper for {lm.adapter.name} "
                        f"(model_type {model_type}); architectures with one: {', '.join(known)}")
    return wrapper


def _template(lm: LoadedModel) -> str | None:
    """The chat template lmms-eval should render with, where the model's own will not do: dowser's
    fallback (USER: / ASSISTANT:, as dowser's evaluator renders it) for a model without one, the
    model's own made to take typed parts (``accepting_parts``) where it takes strings only (lmms-eval's
    chat wrappers hand parts); None where the model's own takes parts already."""
    token = getattr(lm.processor, "image_token", None) or IMAGE_PLACEHOLDER
    enc = Encoder(lm.tokenizer, lm.processor, 1)
    own = getattr(enc._render_with, "chat_template", None) if enc._template is None else None
    if own is None:
        return FALLBACK_LIST_TEMPLATE.replace(IMAGE_PLACEHOLDER, token)
    return None if enc.list_content else accepting_parts(own, token)


def write_checkpoint(lm: LoadedModel, path: Path) -> None:
    """save_pretrained of the model with its processor and tokenizer, with the chat template lmms-eval
    should render (``_template``), so that both harnesses prompt it the same way."""
    lm.model.save_pretrained(path)
    template = _template(lm)
    owners = [o for o in (lm.processor, lm.tokenizer) if o is not None]
    before = [getattr(o, "chat_template", None) for o in owners]
    try:
        if template is not None:
            for o in owners:
                o.chat_template = template
        for o in owners:
            o.save_pretrained(path)
    finally:
        for o, t in zip(owners, before):
            o.chat_template = t


@contextlib.contextmanager
def checkpoint(lm: LoadedModel, directory: Path | None, scratch: Path) -> Iterator[Path]:
    """A directory lmms-eval can load: ``directory`` itself when it is a checkpoint whose chat template
    lmms-eval can use as it is, otherwise a temporary save under ``scratch``, removed on the way out."""
    if directory is not None and _template(lm) is None:
        yield directory
        return
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lmms-checkpoint-", dir=scratch))
    try:
        write_checkpoint(lm, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def offloaded(modules: list[torch.nn.Module]) -> Iterator[None]:
    """dowser's own copies (the base model, the run) wait in host memory while lmms-eval loads its
    copy from the checkpoint, so the GPU holds one model, not three; each returns to its device after.
    A model spread over several devices (device_map) stays where it is."""
    moved = []
    for m in {id(m): m for m in modules}.values():
        devices = {p.device for p in m.parameters()}
        device = devices.pop() if len(devices) == 1 else None
        if device is not None and device.type == "cuda":
            moved.append((m, device))
            m.to("cpu")
    if moved:
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        for m, device in moved:
            m.to(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_kwargs(wrapper: str, ckpt: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """The arguments dowser hands lmms-eval's ``wrapper`` class: the checkpoint, the device (as its
    device_map too: several wrappers default to "auto", spreading the model over every GPU, or to
    "cuda"), batch size 1 and dowser's dtype, each only where the wrapper's constructor names it (most
    of them assert that no unknown argument reaches them; those without ``dtype`` choose their own)."""
    from lmms_eval import models

    accepted = inspect.signature(models.get_model(wrapper).__init__).parameters
    want = {"pretrained": str(ckpt), "device": device, "device_map": device, "batch_size": 1,
            "dtype": _dtype_name(dtype)}
    return {k: v for k, v in want.items() if k in accepted}


def evaluate(ckpt: Path, wrapper: str, tasks: list[Task], device: str, dtype: torch.dtype) -> dict[str, dict]:
    """{task name: {"score", "n", "per_item", "predictions", "lmms"}} for one model, the score in the
    metric's own unit as lmms-eval reports it."""
    v = require()
    from lmms_eval import models
    from lmms_eval.evaluator import simple_evaluate

    manager = check_tasks(tasks)
    kwargs = model_kwargs(wrapper, ckpt, device, dtype)
    out: dict[str, dict] = {}
    by_limit: dict[int | None, list[Task]] = {}
    for t in tasks:   # lmms-eval's limit applies to every task of a call
        by_limit.setdefault(t.limit, []).append(t)
    with contextlib.redirect_stdout(sys.stderr):   # its tables are not our data
        try:
            lm = models.get_model(wrapper)(**kwargs)   # built here, not from a "k=v,..." string: any path works
        except Exception as e:
            raise UserError(f"lmms-eval could not load the model with its {wrapper} wrapper: {type(e).__name__}: {first_line(e)}") from None
        try:
            for limit, group in by_limit.items():
                names = sorted({t.lmms_task for t in group})
                try:
                    res = simple_evaluate(model=lm, tasks=names, task_manager=manager, batch_size=1, limit=limit,
                                          log_samples=True, verbosity="WARNING", device=device)
                except Exception as e:   # its own failure, inside its loop: one line, not its traceback
                    raise UserError(f"lmms-eval failed on {', '.join(names)} ({wrapper} wrapper): "
                                    f"{type(e).__name__}: {first_line(e)}") from None
                for t in group:
                    out[t.name] = read_results(res, t, v)
        finally:
            del lm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out


def read_results(res: dict, task: Task, v: str) -> dict:
    """One task's score and per-item values from simple_evaluate's results. ``task.metric`` is lmms-eval's
    metric name, or ``name,filter`` for a task with several filters; lmms-eval logs each document once
    per filter, filter after filter in the order its results list them (a logged sample does not name
    its filter), so the filter's position picks its block of samples."""
    if task.lmms_task not in res.get("samples", {}):
        subtasks = sorted(n for n in res.get("samples", {}) if n != task.lmms_task)
        raise UserError(f"task {task.name}: {task.lmms_task} is a group of lmms-eval tasks ({', '.join(subtasks)}); "
                        f"give each dowser task one of them as lmms_task")
    metrics = res["results"].get(task.lmms_task, {})
    name, _, want = task.metric.partition(",")
    filters = [k.partition(",")[2] for k in metrics if k.partition(",")[0] == name]
    have = [k for k in metrics if "," in k and "_stderr" not in k.partition(",")[0]]
    if not want and len(filters) > 1:
        raise UserError(f"task {task.name}: lmms-eval's {task.lmms_task} reports {name!r} under several filters; "
                        f"name one as metric: {', '.join(f'{name},{f}' for f in filters)}")
    want = want or (filters[0] if filters else "none")
    key = f"{name},{want}"
    if key not in metrics:
        raise UserError(f"task {task.name}: lmms-eval's {task.lmms_task} reports no {key!r}; "
                        f"it reports: {', '.join(have)}")
    samples = res["samples"][task.lmms_task]
    docs = len({x["doc_id"] for x in samples})
    if len(samples) != docs * len(filters):
        raise UserError(f"task {task.name}: lmms-eval logged {len(samples)} samples for {docs} documents and "
                        f"{len(filters)} filter(s); cannot tell which belong to {key!r}")
    i = filters.index(want)
    samples = sorted(samples[i * docs:(i + 1) * docs], key=lambda x: x["doc_id"])
    try:
        per = [float(x[name]) for x in samples]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"task {task.name}: lmms-eval's {name!r} has no number per sample (the "
                        f"intervals need one); choose a metric scored per item") from None
    preds = [{"id": str(x["doc_id"]), "prediction": str((x.get("filtered_resps") or [""])[0]),
              "answers": [str(x.get("target"))]} for x in samples]
    return {"score": float(metrics[key]), "n": len(per), "per_item": per, "predictions": preds,
            "lmms": {"version": v, "task": task.lmms_task, "metric": key}}
