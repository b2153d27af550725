"""The config: typed sections with their ranges (train/config.py), the layers merged then
validated once, one ``ConfigError`` line per mistake naming the key path, the value, what it
must be and the layer that set it; the resolved config as plain types in a checkpoint."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from core.errors import ConfigError
from model.features import Mel
from pipeline.loaders.backends import LOADERS
from pipeline.loaders.spec import DaliOptions, TorchOptions
from train.cli import parse_args, resolve
from train.config import Config, DataConfig, ModelConfig, load_config, valid_keys


@pytest.mark.parametrize(
    "setting, line",
    [
        ("data.batch_size=0", "data.batch_size must be >= 1 (got 0): samples per batch per rank"),
        ("data.batch_size=abc", "data.batch_size must be int >= 1, got 'abc'"),
        ("data.batch_size=true", "data.batch_size must be int >= 1, got True"),
        ("data.batch_size=2.0", "data.batch_size must be int >= 1, got 2.0"),
        ("data.loader=jax", "data.loader must be dali or torch, got 'jax'"),
        ("data.prefetch_factor=0", "data.prefetch_factor must be >= 1 or null (got 0)"),
        ("train.amp=1", "train.amp must be bool, got 1"),
        ("train.lr=oops", "train.lr must be float > 0, got 'oops'"),
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("run.dir=' '", "run.dir must be a folder, got ' '"),
        ("augment.speed=[1.0]", "augment.speed must be [low, high] or null (got [1.0])"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_what_it_must_be_and_the_value(setting, line):
    with pytest.raises(ConfigError) as err:
        load_config(None, [setting])
    assert str(err.value).startswith(line), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("setting", ["nosuch.key=1", "train.lrr=1", "train=1"])
def test_an_unknown_key_is_refused_listing_the_valid_ones(setting):
    key = setting.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [setting])
    msg = str(err.value)
    assert msg.startswith(f"unknown config key {key!r}; valid keys: "), msg
    assert msg.endswith(", ".join(valid_keys()))
    assert {"data.loader", "data.dir", "train.lr", "data.num_workers", "run.dir"} <= set(
        valid_keys()
    )


def test_the_error_names_the_layer_that_set_the_bad_key_and_a_later_layer_may_fix_it(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  batch_size: 0\ntrain:\n  lr: 3e-4\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: data.batch_size must be >= 1"):
        load_config(path)
    cfg = load_config(path, ["data.batch_size=4"])  # merged, then validated once
    assert cfg.data.batch_size == 4
    assert cfg.train.lr == 3e-4 and type(cfg.train.lr) is float  # YAML 1.1 read it as a str
    with pytest.raises(ConfigError, match="^the checkpoint's config: unknown config key 'x.y'"):
        load_config(path, ["data.batch_size=4"], base={"x": {"y": 1}})
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: section 'data' must be"):
        path.write_text("data: 3\n")
        load_config(path)


def test_the_resolved_config_goes_into_a_checkpoint_as_plain_types_and_comes_back(tmp_path):
    cfg = load_config("configs/augment.yaml", ["train.lr=1", "data.loader=torch"])
    assert type(cfg.train.lr) is float and cfg.augment.speed == [0.9, 1.1]
    torch.save({"config": cfg.to_dict()}, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert back == cfg.to_dict()
    assert set(back) == {"data", "augment", "model", "train", "run"}
    assert load_config(None, base=back) == cfg


def test_each_default_is_written_once():
    model = ModelConfig()
    for name in ("n_mels", "n_fft", "win_length", "hop_length", "fmin", "fmax"):
        assert getattr(model, name) == getattr(Mel(), name)
    data = DataConfig()
    for options in (DaliOptions(), TorchOptions()):
        for f in dataclasses.fields(options):
            assert getattr(data, f.name) == getattr(options, f.name), f.name
    assert DataConfig.model_fields["loader"].annotation.__args__ == tuple(LOADERS)


def test_the_loader_flag_sets_data_loader_and_resume_keeps_the_checkpoints(tmp_path):
    assert resolve(parse_args([]))[0].data.loader == "dali"
    assert resolve(parse_args(["--loader", "torch"]))[0].data.loader == "torch"
    assert resolve(parse_args(["--set", "data.loader=torch"]))[0].data.loader == "torch"
    # a checkpoint: its loader state's backend, unless --loader or --set data.loader says
    cfg = Config()
    state = {"model": {}, "optimizer": {}, "step": 1, "config": cfg.to_dict()}
    state["loader"] = {"backend": "torch"}  # what the trainer records, with the position
    torch.save(state, tmp_path / "last.pt")
    last = str(tmp_path / "last.pt")
    got, _ = resolve(parse_args(["--resume", last]))
    assert got.data.loader == "torch" and got.run.dir == str(tmp_path.resolve())
    assert resolve(parse_args(["--resume", last, "--loader", "dali"]))[0].data.loader == "dali"
    got, _ = resolve(parse_args(["--resume", last, "--set", "data.loader=dali"]))
    assert got.data.loader == "dali"
