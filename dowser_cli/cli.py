"""The `dowser` command line: options and config in, one `run()` per subcommand, errors as one line."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from dowser_cli import __version__
from dowser_cli.errors import Interrupted, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Model-Dowser: data-free importance probing and sparse fine-tuning of (multimodal) LLMs.")


def _command_line() -> str:
    return "dowser " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _version(value: bool):
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


@app.command(epilog="Example: dowser probe smollm2-135m --out scores.safetensors --samples 16")
def probe(
    model: str = typer.Argument(..., help="Alias (configs/models.yaml), local save_pretrained dir, or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Scores artifact to write (.safetensors; .yaml beside it)."),
    samples: Optional[int] = typer.Option(None, help="K: probe samples in all [64]."),
    batch_size: Optional[int] = typer.Option(None, help="B: samples per batch [4]."),
    probes: Optional[int] = typer.Option(None, help="M: Rademacher probes per batch [8]."),
    seq_len: Optional[int] = typer.Option(None, help="Text tokens per sample, BOS included [64]."),
    prefix_len: Optional[str] = typer.Option(None, help="Random prefix length, N or MIN-MAX [1-5]."),
    images: Optional[str] = typer.Option(None, help="off | noise: add a noise image per sample [off]."),
    texts: Optional[Path] = typer.Option(None, help="File of user texts, one per line, instead of synthetic text."),
    layers: Optional[str] = typer.Option(None, help="Decoder layers: all | last:N | first:N | 0-3,7 [all]."),
    targets: Optional[str] = typer.Option(None, help="Linears inside the layers: attn,mlp [attn,mlp]."),
    include_lm_head: Optional[bool] = typer.Option(None, "--include-lm-head/--no-include-lm-head",
                                                   help="Score lm_head (psi = 1) [on]."),
    include_projector: Optional[bool] = typer.Option(None, "--include-projector/--no-include-projector",
                                                     help="Score the vision-language projector [off]."),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 [auto: bf16 on GPU]."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N [auto]."),
    seed: Optional[int] = typer.Option(None, help="Seed for probe text and Rademacher vectors [0]."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (keys as options; CLI wins)."),
    random_init: bool = typer.Option(False, "--random-init", help="Build from the shipped config, no weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted probe from OUT.partial."),
):
    """Score every weight of the language decoder for how much the pretrained model relies on it,
    with self-generated probe text and Rademacher probes (DESIGN section 1)."""
    from dowser_cli import config as cfgmod
    from dowser_cli import probe as probe_mod

    cfg = cfgmod.resolve(probe_mod.ProbeConfig(), config, "probe", dict(
        samples=samples, batch_size=batch_size, probes=probes, seq_len=seq_len, prefix_len=prefix_len,
        images=images, texts=str(texts) if texts else None, layers=layers, targets=targets,
        include_lm_head=include_lm_head, include_projector=include_projector, dtype=dtype, device=device,
        seed=seed))
    sidecar = probe_mod.run(model, out, cfg, random_init=random_init, resume=resume, command=_command_line())
    typer.echo(str(out))
    return sidecar


@app.command(epilog="Example: dowser mask scores.safetensors --ratio 0.1 --out mask.safetensors")
def mask(
    scores: Path = typer.Argument(..., help="Scores artifact from `dowser probe`."),
    out: Path = typer.Option(..., "--out", "-o", help="Mask artifact to write (.safetensors; .yaml beside it)."),
    ratio: Optional[float] = typer.Option(None, help="rho: fraction of each unit that is TRAINABLE [0.1]."),
    strategy: Optional[str] = typer.Option(None, help="dowser | magnitude | wanda | random | inverse [dowser]."),
    granularity: Optional[str] = typer.Option(None, help="Unit of exact-k selection: matrix | row | layer | global [matrix]."),
    layers: Optional[str] = typer.Option(None, help="Decoder layers to mask: last:N | all | ranges [last:20; all if fewer]."),
    targets: Optional[str] = typer.Option(None, help="attn,mlp [attn,mlp]."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random strategy [0]."),
    model: Optional[str] = typer.Option(None, help="Model for |W| (default: the one named in SCORES' .yaml)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (section `mask`; CLI wins)."),
):
    """Select, per weight matrix, exactly round(rho * numel) TRAINABLE entries (the lowest-scoring);
    the rest stay frozen during fine-tuning. Writes a packed-bit mask (1 bit per masked weight)."""
    from dowser_cli import config as cfgmod
    from dowser_cli import mask as mask_mod

    cfg = cfgmod.resolve(mask_mod.MaskConfig(), config, "mask", dict(
        ratio=ratio, strategy=strategy, granularity=granularity, layers=layers, targets=targets, seed=seed))
    mask_mod.run(scores, out, cfg, model_spec=model, command=_command_line())
    typer.echo(str(out))


@app.command(epilog="Example: dowser compare seed0.safetensors seed1.safetensors --json")
def compare(
    a: Path = typer.Argument(..., help="First mask or scores artifact."),
    b: Path = typer.Argument(..., help="Second artifact of the same kind and model."),
    ratio: float = typer.Option(0.1, help="For scores: rho of the matrix masks whose Hamming distance is reported."),
    model: Optional[str] = typer.Option(None, help="Model for |W| when comparing scores (default: from A's .yaml)."),
    per_module: bool = typer.Option(False, "--per-module", help="List every module, not only the overall figures."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Hamming distance between two masks; for two score files, Spearman correlation of the scores and
    Hamming distance of their masks at --ratio (per module and overall)."""
    import json

    from dowser_cli import mask as mask_mod

    res = mask_mod.compare(a, b, ratio=ratio, model_spec=model)
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
    artifact: Path = typer.Argument(..., help="A scores or mask artifact."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
):
    """What an artifact is, what it came from, and a per-layer table (mean score or trainable fraction
    per layer and module type)."""
    import json

    from rich.console import Console

    from dowser_cli import inspect as inspect_mod

    info = inspect_mod.describe(artifact)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        Console().print(inspect_mod.render(info))


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
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"dowser: error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except Interrupted as e:
        print(f"dowser: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("dowser: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("dowser: aborted", file=sys.stderr)
        sys.exit(1)
    except _click_exception() as e:
        e.show()
        sys.exit(e.exit_code)


def _click_exception():
    import click

    return click.ClickException


if __name__ == "__main__":
    main()
