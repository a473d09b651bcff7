"""engine/validate.py: held-out evaluation during training."""

from __future__ import annotations

import json

from helpers import SMALL, cli, read_metrics, write_fixture

from fspo_engine.engine.config import load_config
from fspo_engine.engine.losses import ipo_loss, reward_metrics


def test_held_out_eval_during_training(tmp_path):
    """run.eval_every logs held-out metrics without moving training (this dataset has no val users: test users,
    with a warning); the last ones equal an independent scoring of the stage finals."""
    from fspo_engine.engine.model import load_model
    from fspo_engine.engine.scoring import score_episodes
    from fspo_engine.engine.train import Trainer

    data = write_fixture(tmp_path / "data")
    args = [*SMALL, "--set", "pref_ft.steps=4", "--set", "pref.steps=4", "--set", "pref.beta=0.5",
            "--set", "optim.lr=2e-3", "--set", "data.user_description=true"]
    plain, run = tmp_path / "plain", tmp_path / "run"
    assert cli("train", "--data", str(data), "--out", str(plain), *args).returncode == 0
    res = cli("train", "--data", str(data), "--out", str(run), *args, "--set", "run.eval_every=3",
              "--set", "run.eval_episodes=10")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_metrics(plain), read_metrics(run)
    assert [(r["stage"], r["step"], r["loss"]) for r in a] == [(r["stage"], r["step"], r["loss"]) for r in b]
    ev = [r for r in b if "eval/loss" in r]
    assert [(r["stage"], r["step"]) for r in ev] == [("pref-ft", 3), ("pref-ft", 4), ("ipo", 3), ("ipo", 4)]
    assert 0.0 <= ev[-1]["eval/rewards/accuracy"] <= 1.0 and "eval/rewards/accuracy" not in ev[0]
    assert (run / "loss_curve.png").stat().st_size > 0

    cfg = load_config(run / "config.toml")
    trainer = Trainer(cfg, str(data), str(run), resume=True, log=lambda m: None)
    pref_ft, ipo = load_model(run / "pref-ft").eval(), load_model(run / "ipo").eval()
    eps = trainer.validator.episodes(pref_ft)
    trainer.close()
    assert len(eps) == 10
    ref = score_episodes(pref_ft, eps, cfg.data.max_tokens)
    pol = score_episodes(ipo, eps, cfg.data.max_tokens)
    nll = -(ref.chosen.double().sum() / ref.chosen_tokens.sum()).item()
    assert abs(nll - ev[1]["eval/loss"]) <= 1e-5 * abs(nll), (nll, ev[1])
    want = ipo_loss(pol.chosen, pol.rejected, ref.chosen, ref.rejected, 0.5).item()
    assert abs(want - ev[3]["eval/loss"]) <= 1e-5 * max(1.0, abs(want)), (want, ev[3])
    want = reward_metrics(pol.chosen, pol.rejected, ref.chosen, ref.rejected, 0.5)["rewards/accuracy"]
    assert want == ev[3]["eval/rewards/accuracy"]
    assert ev[3]["eval/episodes"] == 10
    assert all(r["eval/split"] == "test" for r in ev) and "has no val users" in res.stderr
    assert {t.user_id for t in eps} <= {u.user_id for u in trainer.dataset.users_in("test")}
    # The held-out episodes carry the users' true descriptions: every record and the log line say "oracle".
    assert all(r["eval/description"] == "oracle" for r in ev)
    assert "true descriptions: oracle" in res.stderr and "oracle" in res.stderr.split("held-out:")[1]
    # eval scores the run the way it trained (user descriptions first) unless told otherwise.
    res = cli("eval", "--model", str(run), "--data", str(data), "--shots", "1")
    assert res.returncode == 0 and json.loads((run / "eval.json").read_text())["user_description"] is True
    res = cli("eval", "--model", str(run), "--data", str(data), "--shots", "1", "--no-user-description")
    assert res.returncode == 0 and json.loads((run / "eval.json").read_text())["user_description"] is False


def test_held_out_eval_uses_val_users_when_the_data_has_them(tmp_path):
    """Tuning watches val users: with a val split, run.eval_every never scores a test user."""
    from fspo_engine.data_gen.pipeline import generate_dataset
    from fspo_engine.engine.train import Trainer

    data = tmp_path / "data"
    generate_dataset(data, preset="quickstart", users=40, prefs_per_user=4, progress=False, val_fraction=0.25)
    run = tmp_path / "run"
    res = cli("train", "--data", str(data), "--out", str(run), *SMALL, "--set", "pref_ft.steps=2",
              "--set", "pref.steps=0", "--set", "run.eval_every=2", "--set", "run.eval_episodes=6")
    assert res.returncode == 0, res.stderr[-3000:]
    ev = [r for r in read_metrics(run) if "eval/loss" in r]
    assert ev and all(r["eval/split"] == "val" for r in ev)
    assert "val users" in res.stderr.split("held-out:")[1] and "has no val users" not in res.stderr
    trainer = Trainer(load_config(run / "config.toml"), str(data), str(run), resume=True, log=lambda m: None)
    from fspo_engine.engine.model import load_model

    eps = trainer.validator.episodes(load_model(run / "pref-ft"))
    trainer.close()
    val = {u.user_id for u in trainer.dataset.users_in("val")}
    assert eps and {t.user_id for t in eps} <= val
