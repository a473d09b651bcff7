"""A tiny run's artefacts, byte for byte, against the stored ones: a refactor of the trainer changes nothing it
computes, writes or prints.

Three runs on a tiny random model: Pref-FT then IPO with checkpoints and held-out evaluation; the same run
resumed from its mid-IPO checkpoint after losing both finals (it must write the uninterrupted run's files);
the released recipe (configs/official.toml: official windows, both responses summed, RMSprop). Each is
compared with tests/data/golden_run_tiny.json:

- every file of the run directory by sha256, with four exceptions found by diffing two identical runs:
  `*.pt` files are hashed as loaded (torch.save writes a random serialization id), without `rng.python`
  (Python's `random` state: nothing seeds it and training draws nothing from it); `COMPLETE` without the
  `*.pt` entries (their sha256 are those bytes); `metrics.jsonl` without the timing fields; `run.json` and
  the console lines with the test's tmp_path replaced;
- the console lines (stderr; run.progress = false, so no rates or ETAs).

Bytes are those of one torch build on one kind of CPU: the file holds them for torch 2.13.0+cpu on x86-64
with AVX512 and with AVX2 (`ATEN_CPU_CAPABILITY=avx2` runs an AVX512 machine as AVX2); elsewhere the test
skips (test_loss_curve.py holds the numerics within tolerances there). After a change meant to alter training
numerics or output, regenerate with `FSPO_UPDATE_GOLDEN=1 pytest tests/engine/test_golden_run.py`, with and
without ATEN_CPU_CAPABILITY=avx2, and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import pytest
import torch
from test_train import SMALL, cli, write_fixture

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_run_tiny.json"
TIMING = ("episodes_per_s", "mfu", "step_time_s", "tokens_per_s")
OFFICIAL = str(Path(__file__).resolve().parents[2] / "configs" / "official.toml")
RUNS = {
    "ipo": [*SMALL, "--set", "pref_ft.steps=4", "--set", "pref.steps=3", "--save-every", "2",
            "--set", "run.eval_every=2", "--set", "run.eval_episodes=6", "--set", "optim.lr=2e-3",
            "--set", "pref.beta=0.5"],
    "official": ["--config", OFFICIAL, *SMALL, "--shots", "2", "--set", "pref_ft.episodes=36",
                 "--set", "pref.epochs=0", "--set", "pref.steps=2", "--save-every", "2", "--set", "optim.lr=2e-3",
                 "--set", "pref_ft.lr=2e-3", "--set", "pref.lr=1e-3", "--set", "optim.warmup_steps=2"],
}


def environment() -> dict:
    import matplotlib
    import safetensors
    import sentencepiece
    import tokenizers

    return {"torch": torch.__version__, "machine": platform.machine(),
            "cpu": torch.backends.cpu.get_cpu_capability(), "matplotlib": matplotlib.__version__,
            "safetensors": safetensors.__version__, "sentencepiece": sentencepiece.__version__,
            "tokenizers": tokenizers.__version__}


def state_digest(obj, path=()) -> str:
    """sha256 of a loaded torch.save'd object: structure, values, every tensor's dtype, shape and bytes."""
    h = hashlib.sha256()

    def walk(o, where):
        if where == ("rng", "python"):
            return
        if isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k], (*where, k))
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for i, v in enumerate(o):
                walk(v, (*where, i))
            h.update(b"]")
        elif isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(o).encode())

    walk(obj, path)
    return h.hexdigest()


def digest_run(run: Path, tmp: Path) -> dict:
    files, metrics = {}, []
    for p in sorted(run.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(run).as_posix()
        if p.name == "metrics.jsonl":
            metrics = [{k: v for k, v in json.loads(ln).items() if k not in TIMING}
                       for ln in p.read_text(encoding="utf-8").splitlines()]  # fmt: skip
            continue
        if p.suffix == ".pt":
            files[rel] = state_digest(torch.load(p, map_location="cpu", weights_only=True))
            continue
        data = p.read_bytes()
        if p.name == "COMPLETE":
            listed = json.loads(data)["files"]
            data = json.dumps({k: v for k, v in listed.items() if not k.endswith(".pt")}, sort_keys=True).encode()
        elif p.name == "run.json":
            data = data.replace(str(tmp).encode(), b"TMP")
        files[rel] = hashlib.sha256(data).hexdigest()
    return {"files": files, "metrics": metrics}


def train(tmp: Path, data: Path, out: Path, args: list[str], *extra: str) -> list[str]:
    res = cli("train", "--data", str(data), "--out", str(out), "--device", "cpu", *args, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr.replace(str(tmp), "TMP").splitlines()


def forget_the_end(whole: Path, cut: Path):
    """`whole` as a run killed mid-IPO, after its step-2 checkpoint, that had also lost the Pref-FT final."""
    shutil.copytree(whole, cut)
    for p in (cut / "checkpoints" / "ipo" / "step-000000003", cut / "ipo", cut / "pref-ft"):
        shutil.rmtree(p)
    (cut / "loss_curve.png").unlink()
    info = json.loads((cut / "run.json").read_text())
    (cut / "run.json").write_text(json.dumps({**info, "stages": {}}))


@pytest.mark.slow
def test_tiny_runs_write_the_stored_artefacts(tmp_path):
    data = write_fixture(tmp_path / "data")
    got = {}
    for name, args in RUNS.items():
        run = tmp_path / name
        got[name] = {"stderr": train(tmp_path, data, run, args), **digest_run(run, tmp_path)}
    cut = tmp_path / "ipo-resumed"
    forget_the_end(tmp_path / "ipo", cut)
    resumed = {"stderr": train(tmp_path, data, cut, RUNS["ipo"], "--resume"), **digest_run(cut, tmp_path)}
    # Resuming reproduces the uninterrupted run's files exactly (not only its losses).
    assert resumed["files"] == got["ipo"]["files"]
    assert resumed["metrics"] == got["ipo"]["metrics"]
    got["ipo-resumed"] = {"stderr": resumed["stderr"]}

    env = environment()
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else []
    if os.environ.get("FSPO_UPDATE_GOLDEN"):
        recorded = [r for r in recorded if r["environment"] != env] + [{"environment": env, "runs": got}]
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"rewrote {GOLDEN} for {env}")
    want = next((r["runs"] for r in recorded if r["environment"] == env), None)
    if want is None:
        pytest.skip(f"no artefacts recorded for {env} (bytes differ across builds and CPU kinds)")
    for name, run in want.items():
        assert got[name]["stderr"] == run["stderr"], name
        for key in ("metrics", "files"):
            if key in run:
                assert got[name][key] == run[key], (name, key)
