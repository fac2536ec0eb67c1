"""The strategy choice is arithmetic on sizes: the same model and memory give the same answer,
and each rung of the ladder (ddp, zero2, zero3, offload) is taken exactly when the one below
does not fit."""
import pytest

from indai.platform.config import load_config
from indai.platform.errors import UserError
from indai.trainers.config import TrainConfig
from indai.trainers.strategy import choose, requested_strategy, state_bytes

GIB = 2**30


def test_state_bytes_per_strategy():
    p, t, w = 1_000_000, 1_000_000, 4
    assert state_bytes("ddp", p, t, w) == 16_000_000  # 4 weight + 4 grad + 8 Adam
    assert state_bytes("zero0", p, t, w) == 16_000_000
    assert state_bytes("zero1", p, t, w) == 8_000_000 + 2_000_000
    assert state_bytes("zero2", p, t, w) == 4_000_000 + 3_000_000
    assert state_bytes("zero3", p, t, w) == 4_000_000
    assert state_bytes("zero3_offload", p, t, w) == 0
    # frozen weights carry no gradient or optimizer state (LoRA, linear probes)
    assert state_bytes("ddp", 1_000_000, 10_000, 1) == 4_000_000 + 12 * 10_000


def test_small_model_gets_plain_data_parallel():
    c = choose("auto", 40_000_000, 40_000_000, 80 * GIB, 1)
    assert (c.strategy, c.zero_stage, c.offload, c.uses_deepspeed) == ("ddp", None, False, False)
    assert c.state_bytes == 640_000_000
    assert "auto chose ddp" in c.reason and "40.0 M parameters" in c.reason and "80.00 GiB free" in c.reason


def test_optimizer_state_that_does_not_fit_is_sharded_first():
    # 7B on 8 ranks: whole states 112 GB > 40 GiB; zero2 keeps 28 GB weights + 10.5 GB shards = 35.9 GiB
    c = choose("auto", 7_000_000_000, 7_000_000_000, 80 * GIB, 8)
    assert (c.strategy, c.zero_stage, c.offload) == ("zero2", 2, False)
    assert c.state_bytes == 28_000_000_000 + 10_500_000_000


def test_parameters_are_sharded_only_when_zero2_does_not_fit():
    c = choose("auto", 13_000_000_000, 13_000_000_000, 80 * GIB, 8)
    assert (c.strategy, c.zero_stage) == ("zero3", 3)
    assert c.state_bytes == 26_000_000_000


def test_one_rank_goes_from_ddp_to_offload():
    c = choose("auto", 13_000_000_000, 13_000_000_000, 80 * GIB, 1)
    assert (c.strategy, c.zero_stage, c.offload) == ("zero3_offload", 3, True)
    assert "even fully sharded" in c.reason


def test_lora_sized_trainable_set_fits_without_sharding():
    c = choose("auto", 7_000_000_000, 20_000_000, 80 * GIB, 1)
    assert c.strategy == "ddp"


def test_state_fraction_moves_the_boundary():
    p = 1_000_000_000  # 16 GB of states against 20 GiB free
    assert choose("auto", p, p, 20 * GIB, 2, state_fraction=0.9).strategy == "ddp"
    assert choose("auto", p, p, 20 * GIB, 2, state_fraction=0.5).strategy == "zero2"


def test_explicit_strategy_is_kept_and_says_whether_it_fits():
    fits = choose("zero3", 40_000_000, 40_000_000, 80 * GIB, 2)
    assert (fits.strategy, fits.zero_stage) == ("zero3", 3) and "fits" in fits.reason and "NOT" not in fits.reason
    tight = choose("ddp", 13_000_000_000, 13_000_000_000, 80 * GIB, 1)
    assert tight.strategy == "ddp" and "does NOT fit" in tight.reason
    with pytest.raises(ValueError, match="unknown strategy"):
        choose("zero4", 1, 1, GIB, 1)


def test_zero_stage_of_older_recipes_is_an_explicit_request(tmp_path):
    assert requested_strategy("auto", None) == "auto"
    assert requested_strategy("auto", 2) == "zero2"
    assert requested_strategy("zero3_offload", 3) == "zero3_offload"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# indai train r.yaml\nrecipe: r\ndata: {dataset: d}\nrun: {name: r}\n")
    cfg = load_config(TrainConfig, recipe, ["deepspeed.zero_stage=2"])
    assert (cfg.deepspeed.strategy, cfg.deepspeed.zero_stage) == ("auto", 2)
    assert load_config(TrainConfig, recipe, []).deepspeed.strategy == "auto"
    with pytest.raises(UserError, match="contradicts"):
        load_config(TrainConfig, recipe, ["deepspeed.zero_stage=2", "deepspeed.strategy=ddp"])
    with pytest.raises(UserError, match="strategy"):
        load_config(TrainConfig, recipe, ["deepspeed.strategy=zero4"])
