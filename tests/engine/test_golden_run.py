"""A tiny run's artefacts against the stored ones: a refactor of the trainer changes nothing it computes, writes
or prints, on any x86-64 machine.

Three runs on a tiny random model: Pref-FT then IPO with checkpoints and held-out evaluation; the same run
resumed from its mid-IPO checkpoint after losing both finals (it must write the uninterrupted run's files
exactly); the released recipe (configs/official.toml: official windows, both responses summed, RMSprop). Each
is compared with tests/data/golden_run_tiny.json:

- what is discrete by its bytes: every file but the weights and the plot (configs, run.json, tokenizer files,
  checkpoint listings), the console lines, every metric's keys and steps, integer tensors (RNG states);
- floats (metrics, the weights of every model and checkpoint, optimizer states, cached reference log-probs)
  with a relative tolerance of 1e-6 (`close`, `TOL`).

The runs train in float64 (`model.dtype = "float64"`). In fp32, CPUs of one instruction set already differ
in the last bits (matmul blocking, vector widths), and a few optimiser steps amplify that: two AVX2 machines
disagreed by 1e-3 relative on an IPO reward, and AVX2 against AVX512 likewise. In fp64 the same code agrees
to ~1e-12 across CPUs (AVX2 against ATEN_CPU_CAPABILITY=default: 1.1e-12 at worst), six orders of magnitude
inside the tolerance, while a real change moves the results far outside it
(`test_a_real_change_fails_the_comparison`). The fp32 numerics are held by test_loss_curve.py.

Weights are compared through a summary per tensor (`tensor_summary`): its L1 mass and its projection on a fixed
random vector, the projection within 1e-6 of the L1 mass. After a change meant to alter training numerics or
output, regenerate with `FSPO_UPDATE_GOLDEN=1 pytest tests/engine/test_golden_run.py` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import SMALL, cli, write_fixture

from fspo_engine.engine import checkpoint as ckpt

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_run_tiny.json"
TOL = 1e-6  # relative, for every float
TIMING = ("episodes_per_s", "mfu", "step_time_s", "tokens_per_s")
OFFICIAL = str(Path(__file__).resolve().parents[2] / "configs" / "official.toml")
FP64 = ["--set", "model.dtype=float64"]
RUNS = {
    "ipo": [*SMALL, *FP64, "--set", "pref_ft.steps=4", "--set", "pref.steps=3", "--save-every", "2",
            "--set", "run.eval_every=2", "--set", "run.eval_episodes=6", "--set", "optim.lr=2e-3",
            "--set", "pref.beta=0.5"],
    "official": ["--config", OFFICIAL, *SMALL, *FP64, "--shots", "2", "--set", "pref_ft.episodes=36",
                 "--set", "pref.epochs=0", "--set", "pref.steps=2", "--save-every", "2", "--set", "optim.lr=2e-3",
                 "--set", "pref_ft.lr=2e-3", "--set", "pref.lr=1e-3", "--set", "optim.warmup_steps=2"],
}


def environment() -> dict:
    """Where the record was made: shown when a comparison fails (a changed tokenizer library, say)."""
    import safetensors
    import sentencepiece
    import tokenizers

    return {"torch": torch.__version__, "machine": platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability(),
            "safetensors": safetensors.__version__, "sentencepiece": sentencepiece.__version__,
            "tokenizers": tokenizers.__version__}


# ------------------------------------------------------------------------------------------------ digests


def _projection(n: int) -> torch.Tensor:
    """A fixed vector of n uniform(-1, 1) weights (fp64 draws are the same on every CPU)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 2 - 1


def tensor_summary(t: torch.Tensor):
    """A float tensor as [dtype, shape, L1 mass, projection on a fixed random vector]: both move with any
    change of its values (a permutation too, through the projection); other tensors by their bytes."""
    t = t.detach().cpu().contiguous()
    if not t.is_floating_point():
        return f"{t.dtype}{tuple(t.shape)} sha256:{hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()}"
    x = t.double().reshape(-1)
    return [str(t.dtype), list(t.shape), float(x.abs().sum()), float(x @ _projection(x.numel()))]


def state_summary(obj, where=()):
    """A loaded torch.save'd object with every tensor summarised; Python's `random` state left out (nothing
    seeds it and training draws nothing from it)."""
    if isinstance(obj, dict):
        return {repr(k): state_summary(v, (*where, k)) for k, v in obj.items() if (*where, k) != ("rng", "python")}
    if isinstance(obj, (list, tuple)):
        return [state_summary(v, (*where, i)) for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        return tensor_summary(obj)
    return obj


def _png_size(data: bytes) -> list[int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return list(struct.unpack(">II", data[16:24]))


def digest_run(run: Path, tmp: Path) -> dict:
    files, metrics = {}, []
    for p in sorted(run.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(run).as_posix()
        data = p.read_bytes()
        if p.name == "metrics.jsonl":
            metrics = [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in data.splitlines()]
        elif p.suffix == ".safetensors":
            from safetensors.torch import load

            files[rel] = {name: tensor_summary(t) for name, t in sorted(load(data).items())}
        elif p.suffix == ".pt":
            blob = torch.load(p, map_location="cpu", weights_only=True)
            if rel.startswith("reference/"):  # named by the reference weights' bytes: by its plan instead
                rel = f"reference/{hashlib.sha256(blob['plan'].encode()).hexdigest()[:16]}.pt"
            files[rel] = state_summary(blob)
        elif p.suffix == ".png":
            files[rel] = {"png": _png_size(data)}
        elif p.name == "COMPLETE":  # sha256 of the weights' bytes: names and sizes, and that they verify
            listed = json.loads(data)["files"]  # (a .pt's size varies: it pickles Python's random state)
            files[rel] = {"files": {k: None if k.endswith(".pt") else v["size"] for k, v in sorted(listed.items())},
                          "verifies": ckpt.verify(p.parent)}
        else:
            files[rel] = hashlib.sha256(data.replace(str(tmp).encode(), b"TMP")).hexdigest()
    return {"files": files, "metrics": metrics}


# ------------------------------------------------------------------------------------------------ comparison


def _is_summary(x) -> bool:
    return isinstance(x, list) and len(x) == 4 and isinstance(x[0], str) and isinstance(x[1], list) \
        and all(isinstance(v, float) for v in x[2:])


def close(want, got, where: str = "") -> list[str]:
    """Where `got` differs from `want`: floats beyond TOL (relative), anything else at all. A tensor summary's
    projection is held to TOL of its L1 mass (a projection may cancel to near 0)."""
    if isinstance(want, float) and isinstance(got, float):
        ok = abs(got - want) <= TOL * max(abs(want), abs(got))
        return [] if ok else [f"{where}: {got!r} != {want!r} (relative {abs(got - want) / max(abs(want), abs(got)):.1e})"]
    if _is_summary(want) and _is_summary(got):
        if got[:2] != want[:2]:
            return [f"{where}: {got[:2]} != {want[:2]}"]
        l1, proj = want[2], want[3]
        bad = abs(got[2] - l1) > TOL * l1 or abs(got[3] - proj) > TOL * l1
        return [f"{where}: L1 {got[2]!r}, projection {got[3]!r} != {l1!r}, {proj!r}"] if bad else []
    if isinstance(want, dict) and isinstance(got, dict):
        if want.keys() != got.keys():
            return [f"{where}: keys {sorted(got.keys() ^ want.keys())} differ"]
        return [d for k in want for d in close(want[k], got[k], f"{where}/{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: {len(got)} entries != {len(want)}"]
        return [d for i, (w, g) in enumerate(zip(want, got)) for d in close(w, g, f"{where}[{i}]")]
    return [] if type(want) is type(got) and want == got else [f"{where}: {got!r} != {want!r}"]


def test_close_holds_floats_to_the_tolerance_and_the_rest_exactly():
    assert not close({"loss": 5.0, "step": 2}, {"loss": 5.0 * (1 + 0.5e-6), "step": 2})
    assert close({"loss": 5.0}, {"loss": 5.0 * (1 + 2e-6)})
    assert close({"step": 2}, {"step": 3}) and close({"step": 2}, {"step": 2.0}) and close(["a"], ["b"])
    assert close({"a": 1}, {"a": 1, "b": 2})
    t = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert not close(tensor_summary(t), tensor_summary(t * (1 + 1e-9)))
    assert close(tensor_summary(t), tensor_summary(t * (1 + 1e-5)))
    assert close(tensor_summary(t), tensor_summary(t.flip(0)))  # same L1 mass, other projection
    assert close(tensor_summary(t), tensor_summary(t.float()))  # another dtype
    assert close(tensor_summary(torch.arange(3)), tensor_summary(torch.arange(1, 4)))


# ------------------------------------------------------------------------------------------------ the runs


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


def recorded() -> dict:
    return json.loads(GOLDEN.read_text())


def compare(want: dict, got: dict) -> list[str]:
    problems = []
    for name, run in want.items():
        if got[name]["stderr"] != run["stderr"]:
            problems.append(f"{name}: console lines differ:\n  {got[name]['stderr']}\n  != {run['stderr']}")
        for key in ("metrics", "files"):
            if key in run:
                problems += close(run[key], got[name][key], f"{name}/{key}")
    return problems


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
    # Resuming reproduces the uninterrupted run's files exactly (not only its losses), on the same machine.
    assert resumed["files"] == got["ipo"]["files"]
    assert resumed["metrics"] == got["ipo"]["metrics"]
    got["ipo-resumed"] = {"stderr": resumed["stderr"]}

    if os.environ.get("FSPO_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"environment": environment(), "runs": got}, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"rewrote {GOLDEN}")
    want = recorded()
    problems = compare(want["runs"], got)
    assert not problems, (f"{len(problems)} differences (recorded in {want['environment']}, this is "
                          f"{environment()}):\n" + "\n".join(problems[:30]))


@pytest.mark.slow
def test_a_real_change_fails_the_comparison(tmp_path):
    """The comparison can fail: the IPO run with its learning rate changed by one part in 10^4 (each step's
    update moves by as much) lands outside the tolerance."""
    data = write_fixture(tmp_path / "data")
    args = [a if a != "optim.lr=2e-3" else "optim.lr=2.0002e-3" for a in RUNS["ipo"]]
    assert args != RUNS["ipo"]
    run = tmp_path / "ipo"
    got = {"ipo": {"stderr": train(tmp_path, data, run, args), **digest_run(run, tmp_path)}}
    want = {"ipo": recorded()["runs"]["ipo"]}
    problems = compare(want, got)
    assert any("/metrics[" in p and "loss" in p for p in problems), problems[:5]
    assert any(".safetensors/" in p for p in problems), problems[:5]
