"""Every shipped YAML loads and validates for each stage section it has; CLI options override files."""
from pathlib import Path

import pytest

from dowser_cli import config as cfgmod
from dowser_cli import finetune, masking, merge, probing
from dowser_cli.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "probe": (probing.ProbeConfig, probing.validate),
    "mask": (masking.MaskConfig, masking.validate),
    "finetune": (finetune.FinetuneConfig, finetune.validate),
    "merge": (merge.MergeConfig, merge.validate),
}


@pytest.mark.parametrize("path", sorted((ROOT / "dowser_cli" / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path):
    from dowser_cli.models import aliases

    data = cfgmod.load_yaml_file(path)
    if path.name == "models.yaml":
        assert {"llava-1.5-7b", "smollm2-135m", "smol-llava", "tiny-llama"} <= set(aliases())
        return
    found = [s for s in SECTIONS if s in data]
    assert found or "tasks" in data or "include" in data, f"{path}: no known section"
    for section in found:
        cls, check = SECTIONS[section]
        check(cfgmod.resolve(cls(), path, section, {}))


def test_cli_overrides_file_and_unknown_keys_are_refused(tmp_path):
    recipe = ROOT / "dowser_cli" / "configs" / "recipes" / "paper.yaml"
    cfg = cfgmod.resolve(finetune.FinetuneConfig(), recipe, "finetune", {"lr": 1e-3, "epochs": None})
    assert cfg.lr == 1e-3 and cfg.epochs == 5 and cfg.grad_accum == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  lr: 1e-4\n  learning_rate: 3\n")
    with pytest.raises(UserError, match="unknown key.*learning_rate"):
        cfgmod.resolve(finetune.FinetuneConfig(), bad, "finetune", {})


@pytest.mark.parametrize("recipe,lm_head", [("paper.yaml", True), ("paper-8gpu.yaml", True), ("paper-nvila.yaml", False)])
def test_paper_recipes_follow_the_official_runs_on_lm_head(recipe, lm_head):
    # the authors' LLaVA run freezes only the backbone (lm_head trains); their NVILA run freezes the LLM
    cfg = cfgmod.resolve(finetune.FinetuneConfig(), ROOT / "dowser_cli" / "configs" / "recipes" / recipe, "finetune", {})
    assert cfg.train_lm_head is lm_head and cfg.tune_layers == "last:20" and cfg.lr == 2e-5
    p = cfgmod.resolve(probing.ProbeConfig(), ROOT / "dowser_cli" / "configs" / "recipes" / recipe, "probe", {})
    assert (p.top_k, p.temperature, p.top_p, p.repetition_penalty, p.suppress) == (50, 0.9, 0.9, 1.05, "multimodal")


def test_probe_config_by_a_recipes_name_reads_its_probe_section(tmp_path):
    """`dowser probe MODEL --config paper-8gpu` (docs/distributed.md) stopped with "no such file, nor a
    shipped name": probe looked only among the probe settings. A recipe's name now gives its probe:
    section (a probe setting of the same name comes first); the resolved config is saved beside the scores."""
    import yaml

    from conftest import run_cli

    assert cfgmod.find("paper", ("probe", "recipes")) == cfgmod.SHIPPED_DIR / "probe" / "paper.yaml"
    assert cfgmod.find("paper-8gpu", ("probe", "recipes")) == cfgmod.SHIPPED_DIR / "recipes" / "paper-8gpu.yaml"
    out = tmp_path / "s.safetensors"
    r = run_cli("probe", "tiny-llama", "--config", "paper-8gpu", "--samples", "2", "--batch-size", "2", "--probes", "2",
                "--seq-len", "8", "--out", out)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(out.with_suffix(".yaml").read_text())["config"]
    assert (cfg["top_k"], cfg["suppress"], cfg["prefix_len"], cfg["samples"]) == (50, "multimodal", "1-5", 2)
    bad = run_cli("probe", "tiny-llama", "--config", "no-such", "--out", tmp_path / "x.safetensors")
    assert bad.returncode == 2 and "names: cpu-small, paper, paper-8gpu, paper-nvila, quick" in bad.stderr, bad.stderr


def test_shipped_configs_are_found_by_name_and_a_user_dir_overrides_them(tmp_path, monkeypatch):
    from dowser_cli.models import aliases

    monkeypatch.delenv("DOWSER_CONFIG_DIR", raising=False)
    assert cfgmod.find("paper", "recipes") == cfgmod.SHIPPED_DIR / "recipes" / "paper.yaml"
    assert cfgmod.find("demo", "tasks") == cfgmod.SHIPPED_DIR / "tasks" / "demo.yaml"
    with pytest.raises(UserError, match=r"--config nosuch: no such file, nor a shipped name; names: cpu-small, "
                                        r"paper, paper-8gpu, paper-nvila"):
        cfgmod.find("nosuch", "recipes")
    with pytest.raises(UserError, match=r"--config missing.yaml: no such file"):
        cfgmod.find("missing.yaml", "recipes")
    mine = tmp_path / "mine"
    (mine / "recipes").mkdir(parents=True)
    (mine / "recipes" / "paper.yaml").write_text("finetune:\n  lr: 3.0e-4\n")
    (mine / "models" / "big").mkdir(parents=True)
    (mine / "models" / "big" / "config.json").write_text("{}")
    (mine / "models.yaml").write_text("aliases:\n  mine: {hub: org/mine, config: big}\n  tiny-llama: {tiny: tiny-llava}\n")
    monkeypatch.setenv("DOWSER_CONFIG_DIR", f"{tmp_path / 'absent'}:{mine}")
    assert cfgmod.find("paper", "recipes") == mine / "recipes" / "paper.yaml"          # the user's wins
    assert cfgmod.resolve(finetune.FinetuneConfig(), "paper", "finetune", {}).lr == 3e-4
    assert cfgmod.find("paper-nvila", "recipes").parent == cfgmod.SHIPPED_DIR / "recipes"  # the rest still found
    table = aliases()
    assert table["mine"]["config"] == str(mine / "models" / "big") and table["tiny-llama"] == {"tiny": "tiny-llava"}
    assert "llava-1.5-7b" in table and table["llava-1.5-7b"]["config"].startswith(str(cfgmod.SHIPPED_DIR))

