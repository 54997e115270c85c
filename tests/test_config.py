"""Typed config: presets, files, overrides, strictness, and one flag per field."""

import dataclasses

import pytest

from maskedlm import Config, UserError
from maskedlm.cli import build_parser
from maskedlm.config import SECTIONS, cli_fields, flag_name, load_config_file


def test_defaults_are_the_mini_preset_and_valid():
    cfg = Config()
    cfg.validate()
    ref = Config()
    ref.model.apply_preset("mini")
    assert cfg.model == ref.model


def test_preset_then_explicit_fields_override():
    cfg = Config.from_dict({"model": {"num_layers": 6, "preset": "base"}})
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers) == (768, 12, 6)


@pytest.mark.parametrize("bad, message", [
    ({"modle": {}}, r"unknown section 'modle'"),
    ({"train": {"lr_rate": 1}}, r"unknown key train.lr_rate"),
    ({"train": {"batch_size": "32"}}, r"train.batch_size must be int, got str"),
    ({"train": {"batch_size": 3.5}}, r"train.batch_size must be int"),
    ({"data": {"lowercase": 1}}, r"data.lowercase must be bool"),
    ({"train": {"schedule": "step"}}, r"train.schedule must be one of 'linear', 'cosine'"),
    ({"model": {"preset": "huge"}}, r"unknown model preset 'huge'"),
    ({"model": {"vocab_size": 100}}, r"model.vocab_size is set from the tokenizer"),
    ({"train": []}, r"section 'train' must be a mapping"),
])
def test_bad_config_is_a_clear_error(bad, message):
    with pytest.raises(UserError, match=message):
        Config.from_dict(bad)


@pytest.mark.parametrize("change, message", [
    (("model", "num_heads", 5), r"multiple of model.num_heads"),
    (("data", "seq_len", 9000), r"data.seq_len \(9000\) must be between 8 and model.max_position \(8192\)"),
    (("mask", "mask_prob", 0.0), r"mask.mask_prob"),
    (("train", "grad_accum", 3), r"multiple of train.grad_accum"),
    (("mask", "random_token_frac", 0.5), r"mask_token_frac \+ mask.random_token_frac"),
])
def test_validation_names_the_field(change, message):
    cfg = Config()
    setattr(getattr(cfg, change[0]), change[1], change[2])
    with pytest.raises(UserError, match=message):
        cfg.validate()


def test_yaml_and_toml_files(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  preset: tiny\ntrain:\n  lr: 0.0005\n  max_steps: 10\n")
    (tmp_path / "c.toml").write_text("[model]\npreset = 'tiny'\n[train]\nlr = 5e-4\nmax_steps = 10\n")
    a = Config.from_dict(load_config_file(tmp_path / "c.yaml"))
    b = Config.from_dict(load_config_file(tmp_path / "c.toml"))
    assert a == b and a.model.num_layers == 2 and a.train.lr == 5e-4
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="cannot parse"):
        load_config_file(tmp_path / "broken.yaml")
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(UserError, match="must end in"):
        load_config_file(tmp_path / "c.ini")


def test_command_line_overrides_file(tmp_path):
    from maskedlm.cli import _config_from_args

    (tmp_path / "c.yaml").write_text("model:\n  preset: tiny\ntrain:\n  lr: 0.0005\n  batch_size: 16\n")
    ns = build_parser().parse_args(["pretrain", "--config", str(tmp_path / "c.yaml"), "--lr", "0.002",
                                    "--model", "small", "--no-lowercase", "--train", "a.txt", "b.txt"])
    cfg = _config_from_args(ns)
    assert cfg.train.lr == 0.002 and cfg.train.batch_size == 16
    assert cfg.model.hidden_size == 512 and cfg.data.lowercase is False
    assert cfg.data.train == ["a.txt", "b.txt"]


def test_every_field_is_one_flag_and_flags_are_unique():
    flags = [flag_name(f) for _, f, _ in cli_fields()]
    assert len(flags) == len(set(flags))
    settable = [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls) if not f.metadata["derived"]]
    assert len(settable) == len(flags)
    parser_flags = {a for action in build_parser()._subparsers._group_actions[0].choices["pretrain"]._actions
                    for a in action.option_strings}
    for required in ["--train", "--valid", "--corpus", "--tokenizer", "--vocab-size", "--model", "--seq-len",
                     "--batch-size", "--lr", "--max-steps", "--time-budget", "--seed", "--device", "--out", "--config"]:
        assert required in parser_flags


def test_resolved_applies_the_default_time_budget_only_without_max_steps():
    assert Config().resolved().train.time_budget == 300.0
    cfg = Config()
    cfg.train.max_steps = 10
    assert cfg.resolved().train.time_budget is None
