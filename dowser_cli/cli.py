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
    model: str = typer.Argument(..., help="Alias (`dowser configs` lists them), local save_pretrained dir, or hub id."),
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
    device_map: Optional[str] = typer.Option(None, help="auto | balanced | balanced_low_0 | sequential: a model "
                                             "larger than one GPU, its layers spread over the GPUs by accelerate [off]."),
    seed: Optional[int] = typer.Option(None, help="Seed for probe text and Rademacher vectors [0]."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature of the probe text [0.9]."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus (top-p) sampling of the probe text [0.9]."),
    top_k: Optional[int] = typer.Option(None, help="Top-k sampling of the probe text; 0 = off [50, "
                                        "transformers' default, as the authors]."),
    repetition_penalty: Optional[float] = typer.Option(None, help="Repetition penalty of the probe text [1.05]."),
    suppress: Optional[str] = typer.Option(None, help="Ids never sampled: multimodal (image/video placeholders) | "
                                           "special (every special and added token) [multimodal]."),
    gen_batch_size: Optional[int] = typer.Option(None, help="Samples generated per generate() call [64]."),
    batched_probes: Optional[str] = typer.Option(None, help="auto | on | off: a batch's M backward passes as one "
                                                 "vmapped pass (same numbers) [auto: on for CUDA]."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Batches between resumable partial saves [4]."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file, or a shipped name: paper | quick (keys as options; CLI wins)."),
    random_init: bool = typer.Option(False, "--random-init", help="Build from the shipped config, no weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted probe from OUT.partial."),
    trust_remote_code: bool = TRUST,
):
    """Score every weight of the language decoder for how much the pretrained model relies on it,
    with self-generated probe text and Rademacher probes (docs/method.md)."""
    from dowser_cli import config as cfgmod
    from dowser_cli import probe as probe_mod

    cfg = cfgmod.resolve(probe_mod.ProbeConfig(), config, "probe", kind="probe", overrides=dict(
        samples=samples, batch_size=batch_size, probes=probes, seq_len=seq_len, prefix_len=prefix_len,
        images=images, texts=str(texts) if texts else None, layers=layers, targets=targets,
        include_lm_head=include_lm_head, include_projector=include_projector, dtype=dtype, device=device,
        device_map=device_map, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, suppress=suppress, gen_batch_size=gen_batch_size,
        batched_probes=batched_probes, checkpoint_every=checkpoint_every))
    sidecar = probe_mod.run(model, out, cfg, random_init=random_init, resume=resume, command=_command_line())
    if _rank0():
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
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file or a recipe name (section `mask`; CLI wins)."),
    trust_remote_code: bool = TRUST,
):
    """Select, per weight matrix, exactly round(rho * numel) TRAINABLE entries (the lowest-scoring);
    the rest stay frozen during fine-tuning. Writes a packed-bit mask (1 bit per masked weight)."""
    from dowser_cli import config as cfgmod
    from dowser_cli import mask as mask_mod

    cfg = cfgmod.resolve(mask_mod.MaskConfig(), config, "mask", dict(
        ratio=ratio, strategy=strategy, granularity=granularity, layers=layers, targets=targets, seed=seed))
    mask_mod.run(scores, out, cfg, model_spec=model, command=_command_line())
    typer.echo(str(out))


@app.command(epilog="Example: dowser finetune smol-llava --mask mask.safetensors --data train.json --out runs/digits "
                     "--epochs 1 --train-projector")
def finetune(
    model: str = typer.Argument(..., help="Base model: alias, local save_pretrained dir, or hub id."),
    data: Path = typer.Option(..., "--data", help="Training data: LLaVA conversation JSON (list) or JSONL."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (delta.safetensors, run.yaml)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Mask from `dowser mask`, or a scores file (then "
                                        "--ratio builds the mask). Without it: dense fine-tuning (Full-FT)."),
    ratio: Optional[float] = typer.Option(None, help="rho when --mask is a scores file, and --method supertuning's "
                                          "trainable fraction [0.1]."),
    method: Optional[str] = typer.Option(None, help="masked | full-ft | spider | lora | osf | supertuning [masked with --mask, "
                                         "else full-ft]."),
    lora_r: Optional[int] = typer.Option(None, help="--method lora: adapter rank [8]."),
    lora_alpha: Optional[float] = typer.Option(None, help="--method lora: scaling alpha (update alpha/r * BA) [16]."),
    lora_dropout: Optional[float] = typer.Option(None, help="--method lora: dropout on the adapter input [0]."),
    osf_effective_rank: Optional[float] = typer.Option(None, help="--method osf: frozen top singular directions, "
                                                       "a fraction of the smaller dimension or a count [0.5]."),
    image_folder: Optional[Path] = typer.Option(None, help="Root of the records' image paths [the data file's dir]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [2e-5]."),
    projector_lr: Optional[float] = typer.Option(None, help="Peak lr of a trained projector [0 = --lr]."),
    epochs: Optional[float] = typer.Option(None, help="Epochs [5]."),
    max_steps: Optional[int] = typer.Option(None, help="Optimiser steps; overrides --epochs [0 = from epochs]."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per micro-batch [4]."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimiser step [1]."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (never touches frozen entries) [0]."),
    warmup_ratio: Optional[float] = typer.Option(None, help="Warm-up fraction of the steps [0.03]."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Clip the trainable entries' gradient norm; 0 = off [1]."),
    tune_layers: Optional[str] = typer.Option(None, help="Decoder layers to tune: last:N | all | ranges [the mask's; "
                                              "else last:20, all if fewer]."),
    targets: Optional[str] = typer.Option(None, help="Linears of the tuned layers that train: attn (q/k/v/o) | mlp "
                                          "(gate/up/down) | attn,mlp; the others stay frozen [attn,mlp]."),
    train_projector: Optional[bool] = typer.Option(None, "--train-projector/--freeze-projector",
                                                   help="Train the vision-language projector densely [frozen]."),
    train_vision_tower: Optional[bool] = typer.Option(None, "--train-vision-tower/--freeze-vision-tower",
                                                      help="Train the vision tower densely [frozen]."),
    train_embeddings: Optional[bool] = typer.Option(None, "--train-embeddings/--freeze-embeddings",
                                                    help="Train the input embeddings densely [frozen]."),
    train_lm_head: Optional[bool] = typer.Option(None, "--train-lm-head/--freeze-lm-head",
                                                 help="Train lm_head densely [frozen]."),
    freeze_norms: Optional[bool] = typer.Option(None, "--freeze-norms/--train-norms",
                                                help="Freeze the tuned layers' norms [they train densely]."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help="Recompute activations in backward [off]."),
    max_len: Optional[int] = typer.Option(None, help="Longest record in tokens; longer ones are bad records [2048]."),
    skip_bad: Optional[bool] = typer.Option(None, "--skip-bad/--no-skip-bad",
                                            help="Skip bad records (counted in run.yaml) instead of failing [off]."),
    seed: Optional[int] = typer.Option(None, help="Seed of data order and dropout [0]."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N optimiser steps [0 = only on Ctrl-C]."),
    nan_policy: Optional[str] = typer.Option(None, help="A non-finite loss or gradient norm: stop (one line, the last "
                                             "checkpoint kept) | skip-step (drop that update, counted in run.yaml) "
                                             "[stop]."),
    nan_max_skips: Optional[int] = typer.Option(None, help="skip-step: stop after this many in a row [5]."),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 [auto: bf16 on GPU]."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N [auto]."),
    strategy: Optional[str] = typer.Option(None, help="ddp | fsdp under torchrun / accelerate launch "
                                           "(--batch-size is per rank) [ddp there]."),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML, or a shipped name: paper | paper-8gpu | paper-nvila | cpu-small (CLI wins)."),
    random_init: bool = typer.Option(False, "--random-init", help="Build the base model from its shipped config."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in OUT bit for bit."),
    trust_remote_code: bool = TRUST,
):
    """Fine-tune the selected decoder layers; inside masked matrices only the mask's trainable entries
    change and every frozen entry stays bit-identical to the base model (weight decay included).
    The paper's comparators and PEFT's tuners run through the same loop: --method full-ft | spider | lora |
    osf | supertuning; --targets attn tunes the attention linears only.
    Writes OUT/delta.safetensors (trainable values only) and OUT/run.yaml."""
    from dowser_cli import config as cfgmod
    from dowser_cli import finetune as ft

    cfg = cfgmod.resolve(ft.FinetuneConfig(), config, "finetune", dict(
        method=method, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        osf_effective_rank=osf_effective_rank, ratio=ratio, lr=lr,
        projector_lr=projector_lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        weight_decay=weight_decay, warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, tune_layers=tune_layers,
        targets=targets, train_projector=train_projector, train_vision_tower=train_vision_tower, train_embeddings=train_embeddings,
        train_lm_head=train_lm_head, freeze_norms=freeze_norms, gradient_checkpointing=gradient_checkpointing,
        max_len=max_len, skip_bad=skip_bad, seed=seed, save_every=save_every, nan_policy=nan_policy,
        nan_max_skips=nan_max_skips, dtype=dtype, device=device, strategy=strategy))
    ft.run(model, data, out, cfg, mask_path=mask, image_folder=image_folder, random_init=random_init,
           resume=resume, command=_command_line())
    if _rank0():
        typer.echo(str(out))


@app.command(epilog="Example: dowser merge runs/full-ft --method tailor --data train.json --keep 0.1 "
                     "--out runs/tailor")
def merge(
    run: Path = typer.Argument(..., help="Fine-tuned run directory (typically Full-FT) from `dowser finetune`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (must not exist or be empty)."),
    method: Optional[str] = typer.Option(None, "--method", help="dare | tailor | graft [dare]."),
    data: Optional[Path] = typer.Option(None, "--data", help="Downstream data (finetune's format); required by "
                                        "tailor (calibration) and graft (loss)."),
    image_folder: Optional[Path] = typer.Option(None, help="Root of the records' image paths [the data file's dir]."),
    p: Optional[float] = typer.Option(None, "--p", help="DARE: drop probability of each delta entry [0.9]."),
    keep: Optional[float] = typer.Option(None, help="Tailor: fraction of each 128-column block that keeps its "
                                         "change [0.1]."),
    block: Optional[int] = typer.Option(None, help="Tailor: columns per block [128]."),
    compensation: Optional[str] = typer.Option(None, help="Tailor: official (the authors' += update) | sparsegpt "
                                               "(the textbook -=) [official]."),
    calib_samples: Optional[int] = typer.Option(None, help="Tailor: calibration examples from --data [128]."),
    damp: Optional[float] = typer.Option(None, help="Tailor: Hessian damping, fraction of mean diag [0.01]."),
    budget: Optional[float] = typer.Option(None, help="Graft: base region, fraction of all tuned entries "
                                           "together [0.1]."),
    steps: Optional[int] = typer.Option(None, help="Graft: SGD steps on the relaxed mask [100]."),
    lr: Optional[float] = typer.Option(None, help="Graft: SGD learning rate of the mask logits [1e7]."),
    grad_accum: Optional[int] = typer.Option(None, help="Graft: batches averaged per step [1]."),
    sigmoid_bias: Optional[float] = typer.Option(None, help="Graft: bias inside the relaxation's sigmoid [10]."),
    binarise: Optional[str] = typer.Option(None, help="Graft: round (the authors') | topk (exactly the budget) "
                                           "[round]."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per forward pass [4]."),
    max_len: Optional[int] = typer.Option(None, help="Longest record in tokens [2048]."),
    seed: Optional[int] = typer.Option(None, help="Seed of DARE's drops, the calibration subset, graft batches [0]."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N [auto]; dtype is the run's."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file or a recipe name (section `merge`; CLI wins)."),
    trust_remote_code: bool = TRUST,
):
    """Post-hoc baselines of the paper on a fine-tuned run, as their authors' code: DARE (drop and
    rescale the delta), Model Tailor (per-block patch + compensation, calibrated layer by layer),
    Grafting (the largest changes of the tuned layers, moved by SGD on the downstream loss). DARE and
    Tailor merge the tuned decoder layers' linear weights, Grafting every tensor trained in those
    layers; other trained tensors keep their delta. Writes OUT as a run directory that export /
    eval-forgetting / inspect read."""
    from dowser_cli import config as cfgmod
    from dowser_cli import merge as merge_mod

    cfg = cfgmod.resolve(merge_mod.MergeConfig(), config, "merge", dict(
        method=method, p=p, keep=keep, block=block, compensation=compensation, calib_samples=calib_samples,
        damp=damp, budget=budget, steps=steps, lr=lr, grad_accum=grad_accum, sigmoid_bias=sigmoid_bias,
        binarise=binarise, batch_size=batch_size, max_len=max_len, seed=seed, device=device))
    merge_mod.run(run, out, cfg, data_path=data, image_folder=image_folder, command=_command_line())
    typer.echo(str(out))


@app.command(epilog="Example: dowser export runs/digits --out exported/digits")
def export(
    run: Path = typer.Argument(..., help="Run directory from `dowser finetune`."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (must not exist or be empty)."),
    dtype: Optional[str] = typer.Option(None, help="Weights dtype of the export [the run's]."),
    trust_remote_code: bool = TRUST,
):
    """Write the fine-tuned model (base + delta) as a normal save_pretrained checkpoint with its
    tokenizer/processor, loadable by plain transformers."""
    from dowser_cli import export as export_mod

    export_mod.export(run, out, dtype)
    typer.echo(str(out))


@app.command("eval-forgetting", epilog="Example: dowser eval-forgetting --base smol-llava runs/dowser runs/full-ft "
                                        "--tasks demo --out report/")
def eval_forgetting(
    runs: list[Path] = typer.Argument(None, help="Run directories (from `dowser finetune`) or exported checkpoints."),
    base: str = typer.Option(..., "--base", help="The base model the runs were fine-tuned from (alias, dir, hub id)."),
    tasks: Path = typer.Option(..., "--tasks", help="Task suite YAML, or a shipped name: demo | paper-coco | paper-flickr30k | paper-iconqa | paper-imagenet-r."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory (report.yaml, report.md, report.png, cache/)."),
    batch_size: Optional[int] = typer.Option(None, help="Prompts per generate/forward batch [8]."),
    drift: Optional[bool] = typer.Option(None, "--drift/--no-drift",
                                         help="Add a data-free drift column (KL to the base on probe text) [off]."),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 [auto]."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N [auto]."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Where the suite's `data-root:` files are: "
                                             "the --out parent of `dowser make-data` [./data]."),
    random_init: bool = typer.Option(False, "--random-init", help="The base is built from its shipped config."),
    as_json: bool = typer.Option(False, "--json", help="Print the report's rows as JSON on stdout."),
    trust_remote_code: bool = TRUST,
):
    """Evaluate the base model and each run on the suite's downstream task(s) (D) and upstream tasks (U):
    report.md has one row per model with D, every upstream task, U, H = 2UD/(U+D) and the change of U
    against the base; report.png plots U against D. Results are cached per model and task."""
    import json

    from dowser_cli import evaluate

    cfg = evaluate.EvalConfig(**{k: v for k, v in dict(batch_size=batch_size, drift=drift, dtype=dtype, device=device,
                                                       data_root=str(data_root) if data_root else None).items()
                                 if v is not None})
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
    name: str = typer.Argument(..., help="shapes | digits (built in, nothing downloaded), or a paper dataset "
                               "converted from its official release with --from: coco | flickr30k | iconqa | "
                               "imagenet-r | textvqa | mmbench | gqa | okvqa | ocrvqa (docs/data.md)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (must not exist, or be empty)."),
    source: Optional[Path] = typer.Option(None, "--from", help="A paper dataset's official release files (the "
                                          "layout each expects: docs/data.md)."),
    train: Optional[int] = typer.Option(None, help="Built-in: keep the first N training records [all: shapes 2,000, "
                                        "digits 1,497]."),
    test: Optional[int] = typer.Option(None, help="Built-in: keep the first N test records [all: shapes 200, "
                                       "digits 300]."),
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
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out}: exists and is not empty")
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
    ratio: float = typer.Option(0.1, help="For scores: rho of the matrix masks whose Hamming distance is reported."),
    model: Optional[str] = typer.Option(None, help="Model for |W| when comparing scores (default: from A's .yaml)."),
    per_module: bool = typer.Option(False, "--per-module", help="List every module, not only the overall figures."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    trust_remote_code: bool = TRUST,
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
    artifact: Path = typer.Argument(..., help="A scores or mask artifact, or a run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
):
    """What an artifact is, what it came from, and a per-layer table (mean score, trainable fraction,
    or for a run directory what the fine-tuning changed per layer and module type)."""
    import json

    from rich.console import Console

    from dowser_cli import inspect as inspect_mod

    info = inspect_mod.describe(artifact)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        Console().print(inspect_mod.render(info))


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
