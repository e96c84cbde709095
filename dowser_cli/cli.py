"""The `dowser` command line: options and config in, one `run()` per subcommand, errors as one line."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from dowser_cli.version import __version__
from dowser_cli.errors import Interrupted, UserError
from dowser_cli.evaluate import EvalConfig
from dowser_cli.masking import MaskConfig
from dowser_cli.merge import MergeConfig
from dowser_cli.probing import ProbeConfig
from dowser_cli.training import FinetuneConfig

# rich_markup_mode None: help texts print as written (rich markup would eat "[auto]"-style defaults)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Model-Dowser: data-free importance probing and sparse fine-tuning of (multimodal) LLMs.")


def _rank0() -> bool:
    """Not a rank > 0 of a torchrun / accelerate launch (rank 0 prints the data on stdout for all)."""
    return os.environ.get("RANK", "0") in ("", "0")


def _command_line() -> str:
    return "dowser " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _trust(value: bool) -> bool:
    """--trust-remote-code: let models run code from their repository in this process (off by default)."""
    from dowser_cli.models import allow_remote_code

    allow_remote_code(value)
    return value


TRUST = typer.Option(False, "--trust-remote-code", callback=_trust,
                     help="Allow the model to run code from its repository (NVILA needs it) [off].")


def config_options(cls, section: str, kind: str | tuple[str, ...] = "recipes", config_help: str = ""):
    """Give the command one option per field of the stage's config dataclass (declared once, with its
    default and help, by config.option), and --config; the command receives ``cfg``: defaults <- the
    YAML file's ``section`` <- the options given. The command's own parameters come first."""
    import dataclasses
    import functools
    import inspect
    import types
    import typing

    from dowser_cli import config as cfgmod

    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    extra = []
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        if typing.get_origin(typ) in (typing.Union, types.UnionType):   # `str | None`: the option's type is str
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        decl = f"{flag}/{f.metadata.get('off') or '--no-' + flag[2:]}" if typ is bool else flag
        extra.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[typ],
                                       default=typer.Option(None, decl, help=cfgmod.option_help(f))))
    extra.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                   default=typer.Option(None, "--config", help=config_help)))

    def decorate(fn):
        sig = inspect.signature(fn)
        own = [q.replace(kind=inspect.Parameter.KEYWORD_ONLY) for q in sig.parameters.values() if q.name != "cfg"]

        @functools.wraps(fn)
        def command(**kwargs):
            overrides = {f.name: kwargs.pop(f.name) for f in fields}
            cfg = cfgmod.resolve(cls(), kwargs.pop("config"), section, overrides, kind)
            return fn(cfg=cfg, **kwargs)

        command.__signature__ = sig.replace(parameters=own + extra)
        return command
    return decorate


def _version(value: bool):
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


@app.command(epilog="Example: dowser probe smollm2-135m --out scores.safetensors --samples 16")
@config_options(ProbeConfig, "probe", kind=("probe", "recipes"),
                config_help="YAML file, or a shipped name: a probe setting (paper | quick), else a recipe, whose "
                "probe: section it reads (`dowser configs` lists them; keys as options; CLI wins).")
def probe(
    model: str = typer.Argument(..., help="Alias (`dowser configs` lists them), local save_pretrained dir, or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Scores artifact to write (.safetensors; .yaml beside it)."),
    random_init: bool = typer.Option(False, "--random-init", help="Build from the shipped config, no weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted probe from OUT.partial."),
    trust_remote_code: bool = TRUST,
    cfg: ProbeConfig = None,
):
    """Score every weight of the language decoder for how much the pretrained model relies on it,
    with self-generated probe text and Rademacher probes (docs/method.md)."""
    from dowser_cli import probe as probe_mod

    sidecar = probe_mod.run(model, out, cfg, random_init=random_init, resume=resume, command=_command_line())
    if _rank0():
        typer.echo(str(out))
    return sidecar


@app.command(epilog="Example: dowser mask scores.safetensors --ratio 0.1 --out mask.safetensors")
@config_options(MaskConfig, "mask", config_help="YAML file or a recipe name (section `mask`; CLI wins).")
def mask(
    scores: Path = typer.Argument(..., help="Scores artifact from `dowser probe`."),
    out: Path = typer.Option(..., "--out", "-o", help="Mask artifact to write (.safetensors; .yaml beside it)."),
    model: Optional[str] = typer.Option(None, help="Model for |W| (default: the one named in SCORES' .yaml)."),
    trust_remote_code: bool = TRUST,
    cfg: MaskConfig = None,
):
    """Select, per weight matrix, exactly round(rho * numel) TRAINABLE entries (the lowest-scoring);
    the rest stay frozen during fine-tuning. Writes a packed-bit mask (1 bit per masked weight)."""
    from dowser_cli import mask as mask_mod

    mask_mod.run(scores, out, cfg, model_spec=model, command=_command_line())
    typer.echo(str(out))


@app.command(epilog="Example: dowser finetune smol-llava --mask mask.safetensors --data train.json --out runs/digits "
                     "--epochs 1 --train-projector")
@config_options(FinetuneConfig, "finetune", config_help="Recipe YAML, or a shipped name: paper | paper-8gpu | "
                "paper-nvila | cpu-small (CLI wins).")
def finetune(
    model: str = typer.Argument(..., help="Base model: alias, local save_pretrained dir, or hub id."),
    data: Path = typer.Option(..., "--data", help="Training data, JSON list or JSONL: LLaVA conversations, "
                              "LLaMA-Factory sharegpt or OpenAI-style messages (one layout per file)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (delta.safetensors, run.yaml)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Mask from `dowser mask`, or a scores file (then "
                                        "--ratio builds the mask). Without it: dense fine-tuning (Full-FT)."),
    image_folder: Optional[Path] = typer.Option(None, help="Root of the records' image paths [the data file's dir]."),
    random_init: bool = typer.Option(False, "--random-init", help="Build the base model from its shipped config."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in OUT bit for bit."),
    trust_remote_code: bool = TRUST,
    cfg: FinetuneConfig = None,
):
    """Fine-tune the selected decoder layers; inside masked matrices only the mask's trainable entries
    change and every frozen entry stays bit-identical to the base model (weight decay included).
    The paper's comparators and PEFT's tuners run through the same loop: --method full-ft | replay | spider | lora |
    osf | supertuning; --targets attn tunes the attention linears only.
    Writes OUT/delta.safetensors (trainable values only) and OUT/run.yaml."""
    from dowser_cli import finetune as ft

    ft.run(model, data, out, cfg, mask_path=mask, image_folder=image_folder, random_init=random_init,
           resume=resume, command=_command_line())
    if _rank0():
        typer.echo(str(out))


@app.command(epilog="Example: dowser merge runs/full-ft --method tailor --data train.json --keep 0.1 "
                     "--out runs/tailor")
@config_options(MergeConfig, "merge", config_help="YAML file or a recipe name (section `merge`; CLI wins).")
def merge(
    run: Path = typer.Argument(..., help="Fine-tuned run directory (typically Full-FT) from `dowser finetune`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (must not exist or be empty)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Downstream data (finetune's format); required by "
                                        "tailor (calibration) and graft (loss)."),
    image_folder: Optional[Path] = typer.Option(None, help="Root of the records' image paths [the data file's dir]."),
    trust_remote_code: bool = TRUST,
    cfg: MergeConfig = None,
):
    """Post-hoc baselines of the paper on a fine-tuned run, as their authors' code: DARE (drop and
    rescale the delta), Model Tailor (per-block patch + compensation, calibrated layer by layer),
    Grafting (the largest changes of the tuned layers, moved by SGD on the downstream loss). DARE and
    Tailor merge the tuned decoder layers' linear weights, Grafting every tensor trained in those
    layers; other trained tensors keep their delta. Writes OUT as a run directory that export /
    eval-forgetting / inspect read."""
    from dowser_cli import merge as merge_mod

    merge_mod.run(run, out, cfg, data_path=data, image_folder=image_folder, command=_command_line())
    typer.echo(str(out))


@app.command("import-scores", epilog="Example: dowser import-scores importance_mats_mc_selfgen --model llava-1.5-7b "
                                      "--out scores.safetensors")
def import_scores(
    directory: Path = typer.Argument(..., help="The authors' importance directory (llm_<i>_<module>.pt files)."),
    model: str = typer.Option(..., "--model", help="The model they were computed on (alias, dir, hub id)."),
    out: Path = typer.Option(..., "--out", "-o", help="Scores artifact to write (.safetensors; .yaml beside it)."),
    dtype: str = typer.Option("float32", help="The model dtype masks from these scores are for."),
    random_init: bool = typer.Option(False, "--random-init", help="The model is built from its shipped config."),
    trust_remote_code: bool = TRUST,
):
    """Convert the official script's per-module importance files (mean and std matrices, read with
    torch.load(weights_only=True) only) into a dowser scores artifact of the dense kind; `dowser mask`
    selects from it as from a probe's scores (strategies dowser, inverse, magnitude, random)."""
    from dowser_cli import import_scores as mod

    mod.run(directory, model, out, dtype, random_init=random_init, command=_command_line())
    typer.echo(str(out))


@app.command(epilog="Example: dowser export runs/digits --out exported/digits  (or --format peft --out adapters/digits)")
def export(
    run: Path = typer.Argument(..., help="Run directory from `dowser finetune`."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (must not exist or be empty)."),
    fmt: str = typer.Option("checkpoint", "--format", help="checkpoint (save_pretrained of base + delta) | peft "
                            "(a PEFT adapter: Super-Tuning for a masked run)."),
    dtype: Optional[str] = typer.Option(None, help="Weights dtype of the export [the run's]."),
    trust_remote_code: bool = TRUST,
):
    """Write the fine-tuned model (base + delta) as a normal save_pretrained checkpoint with its
    tokenizer/processor, loadable by plain transformers; or, with --format peft, as a PEFT adapter that
    PeftModel.from_pretrained(base, OUT) loads (the mask's entries and their changes only)."""
    from dowser_cli import export as export_mod

    if fmt not in export_mod.FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(export_mod.FORMATS)}")
    if fmt == "peft":
        export_mod.export_peft(run, out)
    else:
        export_mod.export(run, out, dtype)
    typer.echo(str(out))


@app.command("eval-forgetting", epilog="Example: dowser eval-forgetting --base smol-llava runs/dowser runs/full-ft "
                                        "--tasks demo --out report/")
@config_options(EvalConfig, "eval", config_help="YAML file or a recipe name (section `eval`; CLI wins).")
def eval_forgetting(
    runs: list[Path] = typer.Argument(None, help="Run directories (from `dowser finetune`) or exported checkpoints."),
    base: str = typer.Option(..., "--base", help="The base model the runs were fine-tuned from (alias, dir, hub id)."),
    tasks: str = typer.Option(..., "--tasks", help="Task suite YAML, or a shipped name: demo | paper-coco | "
                              "paper-flickr30k | paper-iconqa | paper-imagenet-r | smoke."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory (report.yaml, report.md, report.png, cache/)."),
    random_init: bool = typer.Option(False, "--random-init", help="The base is built from its shipped config."),
    as_json: bool = typer.Option(False, "--json", help="Print the report's rows as JSON on stdout."),
    trust_remote_code: bool = TRUST,
    cfg: EvalConfig = None,
):
    """Evaluate the base model and each run on the suite's downstream task(s) (D) and upstream tasks (U):
    report.md has one row per model with D, every upstream task, U, H = 2UD/(U+D) and the change of U
    against the base; report.png plots U against D. Results are cached per model and task."""
    import json

    from dowser_cli import evaluate

    report = evaluate.run(base, list(runs or []), tasks, out, cfg, random_init=random_init, command=_command_line())
    if as_json:
        typer.echo(json.dumps(report["rows"], indent=2))
    else:
        typer.echo((out / "report.md").read_text())
        c = report["cache"]
        print(f"{out / 'report.md'}, {out / 'report.png'}; {c['evaluated']} evaluated, {c['hits']} from the cache",
              file=sys.stderr)


@app.command("make-data", epilog="Example: dowser make-data coco --from ~/datasets/coco --out data/coco")
def make_data(
    name: str = typer.Argument(..., help="shapes | digits | zorbish (built in, nothing downloaded; zorbish is "
                               "text only), or a paper dataset "
                               "converted from its official release with --from: coco | flickr30k | iconqa | "
                               "imagenet-r | textvqa | mmbench | gqa | okvqa | ocrvqa (docs/data.md)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (must not exist, or be empty)."),
    source: Optional[Path] = typer.Option(None, "--from", help="A paper dataset's official release files (the "
                                          "layout each expects: docs/data.md)."),
    train: Optional[int] = typer.Option(None, help="Built-in: keep the first N training records [all: shapes 2,000, "
                                        "digits 1,497, zorbish 800]."),
    test: Optional[int] = typer.Option(None, help="Built-in: keep the first N test records [all: shapes 200, "
                                       "digits 300, zorbish 200]."),
    limit: Optional[int] = typer.Option(None, help="Paper dataset: the first N records of each split [all]."),
    class_names: Optional[Path] = typer.Option(None, "--class-names", help="imagenet-r: a file naming the classes "
                                               "('wnid name' lines or JSON) [the release's README.txt]."),
):
    """Write a dataset as dowser reads it: train.json (LLaVA conversations; downstream sets) and test.jsonl
    (held-out questions with answers), images beside them (paper datasets: images/ links to the release's
    image folder, nothing is copied)."""
    from dowser_cli import datasets, prepare
    from dowser_cli.errors import UserError

    if name in datasets.BUILTIN:
        if source is not None or limit is not None:
            raise UserError(f"make-data {name}: a built-in dataset takes no --from / --limit (use --train / --test)")
        files = datasets.write(name, out, train, test)
    elif name in prepare.PREPARERS:
        if source is None:
            raise UserError(f"make-data {name}: needs --from, {prepare.PREPARERS[name].help}")
        if train is not None or test is not None:
            raise UserError(f"make-data {name}: --train / --test are for the built-in datasets; use --limit")
        if class_names is not None and name != "imagenet-r":
            raise UserError(f"make-data {name}: --class-names is for imagenet-r")
        files = prepare.prepare(name, source, out, limit=limit, class_names=class_names)
    else:
        raise UserError(f"unknown dataset {name!r}; available: {', '.join([*datasets.BUILTIN, *prepare.PREPARERS])}")
    for k, v in files.items():
        typer.echo(f"{k}\t{v}")


@app.command(epilog="Example: dowser compare seed0.safetensors seed1.safetensors --json")
def compare(
    a: Path = typer.Argument(..., help="First mask or scores artifact."),
    b: Path = typer.Argument(..., help="Second artifact of the same kind and model."),
    ratio: Optional[float] = typer.Option(None, help="For scores: rho of the matrix masks whose Hamming distance is "
                                          "reported [mask's default, 0.1]."),
    model: Optional[str] = typer.Option(None, help="Model for |W| when comparing scores (default: from A's .yaml)."),
    per_module: bool = typer.Option(False, "--per-module", help="List every module, not only the overall figures."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    trust_remote_code: bool = TRUST,
):
    """Hamming distance between two masks; for two score files, Spearman correlation of the scores and
    Hamming distance of their masks at --ratio (per module and overall)."""
    import json

    from dowser_cli import mask as mask_mod

    res = mask_mod.compare(a, b, ratio=MaskConfig().ratio if ratio is None else ratio, model_spec=model)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    if per_module:
        for name, m in res["modules"].items():
            typer.echo(f"{name}\t" + "\t".join(f"{k} {v:.4f}" for k, v in m.items()))
    typer.echo("overall\t" + "\t".join(f"{k} {v:.4f}" for k, v in res["overall"].items()))


@app.command(epilog="Example: dowser combine task1.safetensors task2.safetensors --op union --out both.safetensors")
def combine(
    a: Path = typer.Argument(..., help="First mask."),
    b: Path = typer.Argument(..., help="Second mask (same model)."),
    op: str = typer.Option(..., "--op", help="union | intersection | difference (A and not B)."),
    out: Path = typer.Option(..., "--out", "-o", help="Mask artifact to write."),
):
    """Set operations on masks of the same model, for continual fine-tuning (e.g. keep what task 1
    trained frozen for task 2: `--op difference`)."""
    from dowser_cli import mask as mask_mod

    side = mask_mod.combine(a, b, op, out, command=_command_line())
    typer.echo(str(out))
    t = side["totals"]
    print(f"{op}: {t['trainable']:,} of {t['numel']:,} trainable ({t['fraction']:.4f})", file=sys.stderr)


@app.command(epilog="Example: dowser inspect mask.safetensors --json")
def inspect(
    artifact: Path = typer.Argument(..., help="A scores or mask artifact, or a run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
):
    """What an artifact is, what it came from, and a per-layer table (mean score, trainable fraction,
    or for a run directory what the fine-tuning changed per layer and module type)."""
    import json

    from rich.console import Console

    from dowser_cli import inspection as inspect_mod

    info = inspect_mod.describe(artifact)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        Console().print(inspect_mod.render(info))


@app.command("inspect-model", epilog="Example: dowser inspect-model nvila-lite-2b --trust-remote-code")
def inspect_model(
    model: str = typer.Argument(..., help="Alias (`dowser configs` lists them), local save_pretrained dir, or hub id."),
    random_init: bool = typer.Option(False, "--random-init", help="Use the alias's shipped config."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
    trust_remote_code: bool = TRUST,
):
    """Where dowser finds a model's parts: its architecture adapter resolved against the module tree
    (built without weights): decoder layers, the linears probed per layer, vision tower, projector,
    final norm, lm_head, and whether noise-image probes are supported."""
    import json

    from rich.console import Console

    from dowser_cli import inspection as inspect_mod

    info = inspect_mod.describe_model(model, random_init=random_init)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        Console().print(inspect_mod.render_model(info))


@app.command(epilog="Example: DOWSER_CONFIG_DIR=~/my-configs dowser configs --json")
def configs(as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout.")):
    """The config directories (DOWSER_CONFIG_DIR's entries in front of the shipped one) and the model
    aliases, probe settings, recipes and task suites they offer by name."""
    import json

    from dowser_cli import config as cfgmod
    from dowser_cli.models import aliases

    info = {"dirs": [str(d) for d in cfgmod.config_dirs()],
            "models": {k: next((str(v[x]) for x in ("hub", "embedded", "tiny") if x in v), "") for k, v in
                       sorted(aliases().items())},
            **{kind: cfgmod.names(kind) for kind in ("probe", "recipes", "tasks")}}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo("config directories (first wins): " + ", ".join(info["dirs"]))
    typer.echo("models:  " + ", ".join(info["models"]))
    for kind in ("probe", "recipes", "tasks"):
        typer.echo(f"{kind + ':':8} " + ", ".join(info[kind]))


def _quiet_libraries() -> None:
    # Our own rich progress is the one on stderr; the libraries' bars and advice would bury it and
    # turn a one-line error into many lines.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    _quiet_libraries()
    _exit(_run_app())


def _run_app() -> int:
    # Under torchrun & co. every rank meets the same error, and each rank says it (tagged with its rank):
    # the first rank to exit makes the launcher kill the others, so "rank 0 speaks for all" would lose
    # the message whenever rank 0 is the slower one.
    tag = "" if _rank0() else f" [rank {os.environ['RANK']}]"
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"dowser: error{tag}: {e}", file=sys.stderr)
        return e.code
    except Interrupted as e:
        print(f"dowser{tag}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("dowser: interrupted", file=sys.stderr)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("dowser: aborted", file=sys.stderr)
        return 1
    except _click_exception() as e:
        e.show()
        return e.exit_code
    return 0


def _exit(code: int) -> None:
    """A rank of a launch that finished its stage leaves without the interpreter's shutdown: it has
    written its files and left the process group, and nothing after that is needed. Finalisation tearing
    down the communication library's threads is the suspected cause of a rank aborting once under gloo
    ("terminate called without an active exception", exit -6, not reproduced since), which the launcher
    reports as a failed run. A failing rank exits normally, after printing its error."""
    if code == 0 and os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _click_exception() -> tuple[type, ...]:
    """The usage-error base classes: typer >= 0.29 raises its vendored click's (typer._click), older
    typer the standalone click's; both print click's one-line usage error."""
    import click

    try:
        from typer import _click as vendored
    except ImportError:
        return (click.ClickException,)
    return (click.ClickException, vendored.ClickException)


if __name__ == "__main__":
    main()
