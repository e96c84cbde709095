"""The `dowser` command line: options and config in, one `run()` per subcommand, errors as one line."""
from __future__ import annotations

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


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
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
