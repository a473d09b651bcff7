"""engine/config.py: typed sections, TOML files and overrides, every bad value named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fspo_engine.engine.config import load_config
from fspo_engine.engine.errors import FspoError


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlrr = 3\n")
    with pytest.raises(FspoError, match="unknown key optim.lrr"):
        load_config(bad)
    bad.write_text("[optim]\nlr = 'fast'\n")
    with pytest.raises(FspoError, match="optim.lr: expected float"):
        load_config(bad)
    bad.write_text("[nope]\nx = 1\n")
    with pytest.raises(FspoError, match=r"unknown section \[nope\]"):
        load_config(bad)
    bad.write_text("[pref]\nloss = 'kto'\n")
    with pytest.raises(FspoError, match="pref.loss"):
        load_config(bad)
    bad.write_text("[optim\n")
    with pytest.raises(FspoError, match=str(bad)):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text("[optim]\nlr = 3e-4\n[data]\nshots = 4\n")
    cfg = load_config(good, {"pref.beta": 0.25})
    assert cfg.optim.lr == 3e-4 and cfg.data.shots == "4" and cfg.pref.beta == 0.25
    for key, value in (("optim.lr", float("nan")), ("optim.beta1", 2.0), ("optim.eps", -1.0),
                       ("optim.min_lr_ratio", -2.0), ("optim.grad_clip", -1.0), ("pref_ft.lr", -0.01),
                       ("run.log_every", 0), ("model.num_hidden_layers", -1), ("model.hidden_size", 30),
                       ("model.num_attention_heads", -1),
                       ("data.seed", -1), ("data.max_tokens", 8), ("model.save_dtype", "int8"),
                       ("optim.name", "adam"), ("optim.alpha", 1.0), ("pref_ft.targets", "rejected"),
                       ("pref_ft.reduction", "none"), ("pref_ft.episodes", -1), ("pref_ft.epochs", -1),
                       ("data.episode_sampling", "windows"), ("data.truncate", "keep_end"),
                       ("data.rejected_description", "other"), ("data.split_special_tokens", "no")):  # fmt: skip
        with pytest.raises(FspoError, match=key.replace(".", r"\.")):
            load_config(None, {key: value})
    # Keys that only make sense together.
    for overrides, key in (({"optim.name": "rmsprop", "optim.weight_decay": 0.1}, "optim.weight_decay"),
                           ({"data.episode_sampling": "official_windows", "data.shots": "1-8"}, "data.shots"),
                           ({"data.episode_sampling": "official_windows", "data.episodes_per_user": 2},
                            "data.episodes_per_user")):  # fmt: skip
        with pytest.raises(FspoError, match=key.replace(".", r"\.")):
            load_config(None, overrides)
    # The shipped recipe loads; a config.toml written before the recipe's keys existed reads them as defaults.
    official = load_config(Path(__file__).resolve().parents[2] / "configs" / "official.toml")
    assert (official.optim.name, official.pref_ft.targets, official.pref_ft.reduction, official.data.bos,
            official.data.episode_sampling, official.data.truncate,
            official.data.split_special_tokens) == ("rmsprop", "both", "sum", False, "official_windows", "keep_start",
                                                    False)  # fmt: skip
    new_keys = {"optim": {"name", "alpha"}, "pref_ft": {"targets", "reduction", "episodes", "epochs"},
                "pref": {"epochs"}, "data": {"episode_sampling", "truncate", "bos", "rejected_description",
                                             "split_special_tokens"}}
    lines, section = [], ""
    for ln in official.resolved_toml().splitlines():
        section = ln.strip("[]") if ln.startswith("[") else section
        if ln.split(" = ")[0] not in new_keys.get(section, ()):
            lines.append(ln)
    (tmp_path / "older.toml").write_text("\n".join(lines))
    older = load_config(tmp_path / "older.toml")
    assert older.optim.name == "adamw" and older.data.bos and older.optim.lr == official.optim.lr
    assert older.data.split_special_tokens
    bad.write_bytes("\ufeff[optim]\nlr = 3e-4\n".encode())  # a BOM, as Windows editors write
    assert load_config(bad).optim.lr == 3e-4
    # The resolved TOML reads back to the same config.
    again = tmp_path / "again.toml"
    again.write_text(cfg.resolved_toml())
    assert load_config(again) == cfg


def test_model_dtypes_and_model_name_is_kept_as_given(tmp_path):
    """float64 is a parameter dtype (the golden run's); an unknown one is named. load_config keeps a
    directory's model.name as written: the trainer resolves a run directory (engine/rundir.py `load_run`)."""
    assert load_config(None, {"model.dtype": "float64"}).model.dtype == "float64"
    with pytest.raises(FspoError, match=r"model\.dtype"):
        load_config(None, {"model.dtype": "float16"})
    assert load_config(None, {"model.name": str(tmp_path)}).model.name == str(tmp_path)
