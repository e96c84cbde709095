"""lmms-eval as a second evaluator for `dowser eval-forgetting` (tasks with ``harness: lmms-eval``).

Each model is handed to lmms-eval as a save_pretrained directory (an exported checkpoint as it is; the
base model and run directories written to a temporary directory under the report's folder and removed
afterwards), through the model wrapper the architecture adapter names (``Adapter.lmms_wrappers``).
lmms-eval computes the metric; its per-sample values give the items' bootstrap intervals like any other
task's. lmms-eval is an optional extra: nothing here imports it until a task needs it."""
from __future__ import annotations

import contextlib
import importlib
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch

from dowser_cli.errors import UserError
from dowser_cli.models import LoadedModel, registry
from dowser_cli.models.chat import FALLBACK_LIST_TEMPLATE, IMAGE_PLACEHOLDER
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
    return v or "?"


def wrapper_for(lm: LoadedModel) -> str:
    model_type = getattr(lm.config, "model_type", None)
    wrapper = lm.adapter.lmms_wrappers.get(model_type)
    if wrapper is None:
        known = sorted(f"{mt} ({w})" for mt, w in registry.lmms_wrappers().items())
        raise UserError(f"harness lmms-eval: no lmms-eval model wrapper for {lm.adapter.name} "
                        f"(model_type {model_type}); architectures with one: {', '.join(known)}")
    return wrapper


def _has_template(lm: LoadedModel) -> bool:
    return bool(getattr(lm.processor, "chat_template", None) or getattr(lm.tokenizer, "chat_template", None))


def write_checkpoint(lm: LoadedModel, path: Path) -> None:
    """save_pretrained of the model with its processor and tokenizer. A model without a chat template
    gets dowser's fallback (USER: / ASSISTANT:, the text dowser's own evaluator renders), so that both
    harnesses prompt it the same way."""
    lm.model.save_pretrained(path)
    owner = lm.processor if lm.processor is not None else lm.tokenizer
    added = not _has_template(lm)
    if added:
        token = getattr(lm.processor, "image_token", None) or IMAGE_PLACEHOLDER
        owner.chat_template = FALLBACK_LIST_TEMPLATE.replace(IMAGE_PLACEHOLDER, token)
    try:
        for extra in (lm.processor, lm.tokenizer):
            if extra is not None:
                extra.save_pretrained(path)
    finally:
        if added:
            owner.chat_template = None


@contextlib.contextmanager
def checkpoint(lm: LoadedModel, directory: Path | None, scratch: Path) -> Iterator[Path]:
    """A directory lmms-eval can load: ``directory`` itself when it is a checkpoint with a chat
    template, otherwise a temporary save under ``scratch``, removed on the way out."""
    if directory is not None and _has_template(lm):
        yield directory
        return
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lmms-checkpoint-", dir=scratch))
    try:
        write_checkpoint(lm, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def evaluate(ckpt: Path, wrapper: str, tasks: list[Task], device: str, dtype: torch.dtype) -> dict[str, dict]:
    """{task name: {"score", "n", "per_item", "predictions", "lmms"}} for one model, the score in the
    metric's own unit as lmms-eval reports it."""
    v = require()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    includes = sorted({str(t.include_path) for t in tasks if t.include_path is not None})
    manager = TaskManager(verbosity="WARNING", include_path=includes or None)
    unknown = sorted({t.lmms_task for t in tasks} - set(manager.all_tasks))
    if unknown:
        raise UserError(f"harness lmms-eval: unknown lmms-eval task(s) {', '.join(unknown)} "
                        f"(lmms-eval {v}; `python -m lmms_eval --tasks list` lists them; local YAMLs need include_path)")
    args: dict[str, Any] = {"pretrained": str(ckpt), "dtype": _dtype_name(dtype)}   # device: simple_evaluate passes it
    if wrapper == "llava_hf":
        args["device_map"] = device    # its default "" is not a device for from_pretrained
    if any(c in str(ckpt) for c in ",="):
        raise UserError(f"harness lmms-eval: {ckpt}: lmms-eval's model arguments cannot hold ',' or '=' in a path")
    model_args = ",".join(f"{k}={v}" for k, v in args.items())
    out: dict[str, dict] = {}
    by_limit: dict[int | None, list[Task]] = {}
    for t in tasks:   # lmms-eval's limit applies to every task of a call
        by_limit.setdefault(t.limit, []).append(t)
    for limit, group in by_limit.items():
        with contextlib.redirect_stdout(sys.stderr):   # its tables are not our data
            res = simple_evaluate(model=wrapper, model_args=model_args, tasks=sorted({t.lmms_task for t in group}),
                                  task_manager=manager, batch_size=1, limit=limit, log_samples=True,
                                  verbosity="WARNING", device=device)
        for t in group:
            out[t.name] = _read(res, t, v)
    return out


def _read(res: dict, task: Task, v: str) -> dict:
    metrics = res["results"].get(task.lmms_task, {})
    key = f"{task.metric},none"
    if key not in metrics:
        have = sorted(k.split(",")[0] for k in metrics if "," in k and "_stderr" not in k)
        raise UserError(f"task {task.name}: lmms-eval's {task.lmms_task} reports no metric {task.metric!r}; "
                        f"it reports: {', '.join(have)}")
    samples = sorted(res["samples"][task.lmms_task], key=lambda x: x["doc_id"])
    try:
        per = [float(x[task.metric]) for x in samples]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"task {task.name}: lmms-eval's {task.metric!r} has no number per sample (the "
                        f"intervals need one); choose a metric scored per item") from None
    preds = [{"id": str(x["doc_id"]), "prediction": str((x.get("filtered_resps") or [""])[0]),
              "answers": [str(x.get("target"))]} for x in samples]
    return {"score": float(metrics[key]), "n": len(per), "per_item": per, "predictions": preds,
            "lmms": {"version": v, "task": task.lmms_task, "metric": key}}
