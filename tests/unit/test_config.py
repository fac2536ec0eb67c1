"""Typed config: YAML + overrides into pydantic models; one-line errors; every shipped recipe loads."""
from pathlib import Path

import pytest

from indai.platform.config import load_config, recipe_command
from indai.platform.errors import UserError
from indai.platform.ingest import DatasetSpec
from indai.trainers.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "trainers" / "recipes").glob("*.yaml"))
SPECS = sorted((REPO / "examples").glob("*/dataset.yaml"))


def test_there_are_recipes_and_specs():
    assert RECIPES and SPECS


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_begins_with_its_command(path):
    cfg = load_config(TrainConfig, path)
    assert recipe_command(path) == f"indai train trainers/recipes/{path.name}"
    assert cfg.run.name and cfg.data.dataset


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.parent.name)
def test_every_dataset_spec_loads_and_begins_with_its_command(path):
    spec = load_config(DatasetSpec, path)
    assert recipe_command(path) == f"indai data ingest examples/{path.parent.name}/dataset.yaml"
    assert spec.sources


def test_overrides_are_typed_and_nested():
    cfg = load_config(TrainConfig, RECIPES[0], ["optim.epochs=3", "optim.lr=0.01", "run.workers=1", "model.sensor.width=8"])
    assert cfg.optim.epochs == 3 and cfg.optim.lr == 0.01 and cfg.run.workers == 1 and cfg.model.sensor.width == 8


def test_flavour_preset_lies_under_explicit_fields():
    cfg = load_config(TrainConfig, RECIPES[0], ["model.flavour=debug"])
    assert cfg.model.text.width == 32  # the recipe leaves text alone: the debug preset decides
    assert cfg.model.dim == 64  # the recipe sets dim: it wins over the preset's 32
    assert load_config(TrainConfig, RECIPES[0]).model.text.width == 64


@pytest.mark.parametrize("override,field", [("optim.epochs=zero", "optim.epochs"), ("run.name=../etc", "run.name"),
                                            ("optim.nope=1", "optim.nope"), ("deepspeed.zero_stage=5", "deepspeed.zero_stage")])
def test_bad_fields_name_the_field(override, field):
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, RECIPES[0], [override])
    assert f"field {field!r}" in str(e.value) and "\n" not in str(e.value)


def test_malformed_yaml_says_where(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("# indai train r.yaml\nrecipe: x\ndata: {dataset: [unclosed\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+"):
        load_config(TrainConfig, p)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(TrainConfig, p)


def test_recipe_without_command_line_is_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("recipe: x\n")
    with pytest.raises(UserError, match="must begin with a comment line"):
        recipe_command(p)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="key.path=value"):
        load_config(TrainConfig, RECIPES[0], ["optim.epochs"])


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    import resource

    from indai.platform.config import MAX_YAML_ALIASES, read_yaml

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):  # fully expanded: 9**10 strings
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match=f"more than {MAX_YAML_ALIASES} aliases"):
        read_yaml(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB: bounded, not expanded


def test_yaml_with_a_few_aliases_and_no_tags_still_loads(tmp_path):
    from indai.platform.config import read_yaml

    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {lr: 0.1}\nfirst: *b\nsecond: *b\n")
    assert read_yaml(ok) == {"base": {"lr": 0.1}, "first": {"lr": 0.1}, "second": {"lr": 0.1}}


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['true']", "!custom 1", "!!python/name:os.system"])
def test_yaml_code_and_unknown_tags_are_refused(tmp_path, tag):
    from indai.platform.config import read_yaml

    p = tmp_path / "tag.yaml"
    p.write_text(f"x: {tag}\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_yaml(p)


def test_an_alias_bomb_in_an_override_stays_a_string():
    from indai.platform.config import parse_override

    raw = "[&a [1,1,1,1,1,1,1,1,1], " + ", ".join(["*a"] * 70) + "]"
    assert parse_override(f"data.dataset={raw}") == (["data", "dataset"], raw)
