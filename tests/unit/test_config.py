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


# ---- what the encoders can take: refused at validation, with the fix in the message ---------------

def _recipe(model: dict) -> dict:
    return {"recipe": "t", "data": {"dataset": "d"}, "run": {"name": "r"}, "model": model}


def _refused(model: dict) -> str:
    from indai.platform.config import validate

    with pytest.raises(UserError) as e:
        validate(TrainConfig, _recipe(model), "recipe.yaml")
    return str(e.value)


RW = {"family": "report_writer", "flavour": "debug", "lm": "tiny-lm"}


@pytest.mark.parametrize("family", [{}, RW], ids=["multimodal", "report_writer"])
@pytest.mark.parametrize("name", ["hf-hub:org/repo", "local-dir:/etc/model", "ResNet50", "resnet50/../x", "r" * 65])
def test_timm_name_must_be_a_plain_architecture_name(family, name):
    msg = _refused({**family, "image": {"timm_name": name}})
    assert "image.timm_name'" in msg and "is not a timm architecture name" in msg
    assert "hub or folder references ('hf-hub:...', 'local-dir:...') are refused" in msg


@pytest.mark.parametrize("family", [{}, RW], ids=["multimodal", "report_writer"])
def test_timm_name_timm_does_not_know_is_refused_with_close_matches(family):
    msg = _refused({**family, "image": {"timm_name": "resnet5"}})
    assert "timm_name 'resnet5' is not an architecture timm" in msg and "did you mean resnet50, " in msg
    for known in ("resnet50", "efficientnet_lite0", "resnet50.a1_in1k"):  # a pretrained tag names the same architecture
        cfg = TrainConfig.model_validate(_recipe({**family, "image": {"timm_name": known}}))
        assert cfg.model.image.timm_name == known


def test_text_width_must_split_into_its_heads():
    msg = _refused({"text": {"width": 50, "heads": 4}})
    assert "text': Value error" in msg and "text.width 50 is not divisible by text.heads 4" in msg and "width of 48 or 52" in msg
    assert TrainConfig.model_validate(_recipe({"text": {"width": 48, "heads": 4}})).model.text.width == 48
    # an hf encoder brings its own width and heads: the byte_transformer's fields do not apply
    hf = {"kind": "hf", "config_from": "all-minilm-l6-v2", "width": 50, "heads": 4}
    assert TrainConfig.model_validate(_recipe({"text": hf})).model.text.kind == "hf"


@pytest.mark.parametrize("family", [{}, RW], ids=["multimodal", "report_writer"])
def test_patch_transformer_width_must_split_into_its_heads(family):
    # one head per 64 channels: width 130 has 2 heads and 130 splits in two, 129 does not
    sensor = {"kind": "patch_transformer", "length": 256, "patch": 16}
    msg = _refused({**family, "sensor": {**sensor, "width": 129}})
    assert "sensor.width 129 is not divisible by the patch_transformer's 2 attention heads" in msg
    assert "use a width of 128 or 130" in msg
    assert TrainConfig.model_validate(_recipe({**family, "sensor": {**sensor, "width": 130}})).model.sensor.width == 130
    msg = _refused({**family, "sensor": {**sensor, "length": 16, "patch": 32}})
    assert "sensor.length 16 is shorter than sensor.patch 32" in msg


def test_the_shortest_cnn1d_window_is_the_encoders_own():
    """The limit is computed from the stages SensorCNN is built from: at it the real encoder
    encodes a window, one sample less and the real encoder fails (what the check prevents)."""
    import torch

    from indai.trainers.models.checks import cnn1d_min_length, cnn1d_output_length
    from indai.trainers.models.multimodal.model import SensorCNN

    least = cnn1d_min_length()
    assert least == 128 and cnn1d_output_length(128) == 1 and cnn1d_output_length(64) == 0
    encoder = SensorCNN(channels=2, dim=16, width=8).eval()
    assert encoder(torch.zeros(3, 2, least)).shape == (3, 16)
    with pytest.raises(RuntimeError, match="Invalid computed output size: 0"):
        encoder(torch.zeros(3, 2, least - 1))


@pytest.mark.parametrize("family", [{}, RW], ids=["multimodal", "report_writer"])
def test_cnn1d_window_too_short_is_refused_in_the_recipe(family):
    msg = _refused({**family, "sensor": {"kind": "cnn1d", "length": 64}})
    assert "sensor.length 64 is too short for the cnn1d encoder" in msg and "at least 128 samples" in msg
    assert "sensor.kind: patch_transformer" in msg
    assert TrainConfig.model_validate(_recipe({**family, "sensor": {"kind": "cnn1d", "length": 128}})).model.sensor.length == 128


def test_a_dataset_window_too_short_is_refused_by_the_launcher_naming_the_dataset():
    """The launcher sets sensor.length from the dataset's window: refused there, before a job
    starts, not in the worker's first forward ("max_pool1d() Invalid computed output size: 0")."""
    from indai.trainers.launch import complete_from_manifest

    cfg = TrainConfig.model_validate(_recipe({"modalities": ["sensor"], "sensor": {"kind": "cnn1d"}}))
    manifest = {"name": "short", "version": "v1", "classes": ["a", "b"],
                "modalities": {"sensor": {"channels": ["x"], "window": 64, "norm": {"mean": [0.0], "std": [1.0]}}}}
    with pytest.raises(UserError, match=r"^dataset short@v1 does not fit the model config: sensor.length 64 is too short "
                                        r"for the cnn1d encoder") as e:
        complete_from_manifest(cfg, manifest)
    assert "at least 128 samples" in str(e.value)
    manifest["modalities"]["sensor"]["window"] = 128
    assert complete_from_manifest(cfg, manifest).model.sensor.length == 128
