"""One CLI chain over all stages that exist, in a temporary directory, as a user runs them."""
import json

import pytest

from dowser_cli import artifacts

from conftest import run_cli


def test_every_stage_chained_as_docs_commands_md_runs_them(tmp_path):
    """docs/commands.md's runnable blocks (probe twice, mask, inspect, compare, combine, make-data,
    finetune masked / Full-FT / LoRA, export, eval-forgetting, merge, configs) in one directory, as
    real subprocesses; then each artifact names the one before it by hash."""
    from test_docs import CHAIN, run_doc

    def ok(*args):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 0, f"{args}: {r.stderr}"
        return r

    run_doc(CHAIN, tmp_path)
    info = json.loads(ok("inspect", "mask.safetensors", "--json").stdout)
    assert info["kind"] == "dowser.mask" and abs(info["totals"]["fraction"] - 0.1) < 1e-3
    scores_cmp = json.loads(ok("compare", "scores.safetensors", "scores-s1.safetensors", "--json").stdout)
    masks_cmp = json.loads(ok("compare", "mask.safetensors", "mask-s1.safetensors", "--json").stdout)
    # the same matrix masks, reached two ways (the scores also cover lm_head, which masks leave out)
    assert len(masks_cmp["modules"]) == 3 * 7
    for name, m in masks_cmp["modules"].items():
        assert abs(scores_cmp["modules"][name.removesuffix(".weight")]["hamming"] - m["hamming"]) < 1e-12
    side = artifacts.read_yaml(tmp_path / "s1-only.yaml")
    assert side["inputs"]["a"]["sha256"] == artifacts.sha256_file(tmp_path / "mask-s1.safetensors")
    assert side["inputs"]["b"]["sha256"] == artifacts.sha256_file(tmp_path / "mask.safetensors")
    assert 0 < side["totals"]["fraction"] < 0.1
    run_side = artifacts.read_yaml(tmp_path / "runs" / "masked" / "run.yaml")
    assert run_side["inputs"]["mask"]["sha256"] == artifacts.sha256_file(tmp_path / "mask.safetensors")
    assert run_side["inputs"]["data"]["sha256"] == artifacts.sha256_file(tmp_path / "shapes" / "train.json")
    assert artifacts.read_yaml(tmp_path / "mask.yaml")["inputs"]["scores"]["sha256"] == \
        artifacts.sha256_file(tmp_path / "scores.safetensors")
    assert artifacts.read_yaml(tmp_path / "exported" / "masked" / "dowser_export.yaml")["delta_sha256"] == \
        artifacts.sha256_file(tmp_path / "runs" / "masked" / "delta.safetensors")
    assert json.loads(ok("inspect", "runs/masked", "--json").stdout)["method"] == "dowser-mask"
    assert json.loads(ok("inspect", "runs/dare", "--json").stdout)["method"] == "dare"
    report = artifacts.read_yaml(tmp_path / "report" / "report.yaml")
    assert [r["model"] for r in report["rows"]] == ["base (tiny-llava)", "masked", "full-ft"]
    curve = artifacts.read_yaml(tmp_path / "report-curve" / "report.yaml")
    assert [r["model"] for r in curve["rows"]] == ["base (tiny-llava)", "curve@2", "curve@4", "curve", "masked"]
    assert [(p["model"], p["reference"]) for p in curve["paired"]["pairs"]] == [("curve@2", "masked")]
    assert [d["step"] for d in artifacts.read_yaml(tmp_path / "runs" / "curve" / "run.yaml")["drift_curve"]] == [1, 2, 3, 4]


def test_every_commands_help_ends_with_an_example():
    from typer.testing import CliRunner

    from dowser_cli.cli import app

    runner = CliRunner()
    for cmd in ("probe", "mask", "compare", "combine", "inspect", "finetune", "export", "merge", "eval-forgetting",
                "make-data", "import-scores", "inspect-model"):
        r = runner.invoke(app, [cmd, "--help"], terminal_width=100)
        assert r.exit_code == 0 and "Example: dowser" in r.output, (cmd, r.output[-300:])
    # bracketed defaults survive the help formatter
    assert "[auto: bf16 on GPU]" in " ".join(runner.invoke(app, ["finetune", "--help"]).output.split())


@pytest.mark.parametrize("args,want", [
    (["mask", "--bogus"], "No such option: --bogus"),
    (["mask"], "Missing argument 'scores'"),
    (["mask", "S", "--ratio", "abc", "--out", "M"], "Invalid value for '--ratio'"),
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
    (["finetune", "M", "--out", "r", "--data"], "Option '--data' requires an argument"),
])
def test_usage_errors_are_clicks_short_message_and_exit_2(args, want, tmp_path):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 4 and not list(tmp_path.iterdir())


# ---- remote code only when asked --------------------------------------------------------------------

@pytest.mark.parametrize("command", [["probe", "nvila-lite-2b", "--out", "s.safetensors"],
                                     ["finetune", "nvila-lite-2b", "--data", "d.json", "--out", "run"],
                                     ["eval-forgetting", "--base", "nvila-lite-2b", "--tasks", "DEMO", "--out", "r"]])
def test_a_model_that_needs_remote_code_is_refused_without_the_flag(tmp_path, command):
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "t.yaml").write_text("tasks: []\n")
    from conftest import ROOT
    command = [str(ROOT / "dowser_cli" / "configs" / "tasks" / "demo.yaml") if c == "DEMO" else c for c in command]
    r = run_cli(*command, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "dowser: error: model nvila-lite-2b: runs code from its repository (Efficient-Large-Model/NVILA-Lite-2B); "
        "pass --trust-remote-code to allow it"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "t.yaml"]


def test_the_flag_lets_it_past_the_refusal_and_a_local_config_with_code_is_refused_too(tmp_path):
    r = run_cli("probe", "nvila-lite-2b", "--trust-remote-code", "--out", tmp_path / "s.safetensors")
    assert r.returncode == 2 and "--trust-remote-code" not in r.stderr       # on to the hub (none here)
    local = tmp_path / "custom"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "custom_x",
                                                   "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    r = run_cli("probe", local, "--out", tmp_path / "t.safetensors")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"dowser: error: model {local}: its config needs code from its repository; pass --trust-remote-code to "
        f"allow it"]
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "t.safetensors").exists()


def test_no_shipped_alias_or_config_turns_remote_code_on():
    from conftest import ROOT
    from dowser_cli.models import aliases

    assert not any("trust_remote_code" in entry for entry in aliases().values())
    assert not [p for p in (ROOT / "dowser_cli" / "configs").rglob("*.yaml") if "trust_remote_code: true" in p.read_text()]


def test_every_config_field_is_an_option_of_its_command_declared_once():
    """The options come from the stage's config dataclass: each field has its flag, its help with the
    default, and no default of its own (None: a --config file's value, else the dataclass's, applies)."""
    import dataclasses

    from typer.main import get_command

    from dowser_cli.cli import app
    from dowser_cli.evaluate import EvalConfig
    from dowser_cli.masking import MaskConfig
    from dowser_cli.merge import MergeConfig
    from dowser_cli.probing import ProbeConfig
    from dowser_cli.training import FinetuneConfig

    group = get_command(app)
    for name, cls in (("probe", ProbeConfig), ("mask", MaskConfig), ("finetune", FinetuneConfig),
                      ("merge", MergeConfig), ("eval-forgetting", EvalConfig)):
        params = {p.name: p for p in group.commands[name].params}
        assert "config" in params, name
        for f in dataclasses.fields(cls):
            p = params.get(f.name)
            assert p is not None, f"{name}: no option for {cls.__name__}.{f.name}"
            assert p.default is None and p.help.endswith("]") and f.metadata["help"] in p.help, (name, f.name)
            assert f"--{f.name.replace('_', '-')}" in p.opts, (name, f.name, p.opts)
    ft = {p.name: p for p in group.commands["finetune"].params}
    assert ft["adam_beta2"].help == "AdamW beta2. [0.999]" and ft["lr_scheduler"].help.endswith("[cosine]")
    assert ft["train_projector"].secondary_opts == ["--freeze-projector"]


def test_a_recipe_without_the_stage_section_leaves_its_defaults(tmp_path):
    from dowser_cli import config as cfgmod
    from dowser_cli.evaluate import EvalConfig

    assert cfgmod.resolve(EvalConfig(), "paper", "eval", {}) == EvalConfig()          # no eval: section
    (tmp_path / "r.yaml").write_text("eval:\n  bootstrap: 200\n")
    assert cfgmod.resolve(EvalConfig(), tmp_path / "r.yaml", "eval", {"batch_size": 2}) == \
        EvalConfig(bootstrap=200, batch_size=2)
