"""`fspo-engine gen-data`: bad arguments and unreadable files give one clear line, exit != 0, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fspo_engine.cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, ["gen-data", *map(str, args)])


def test_generates_and_prints_statistics(tmp_path):
    result = invoke(
        "--out", tmp_path, "--preset", "quickstart", "--users", 20, "--prefs-per-user", 3, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "60 prefs" in result.output and "label entropy" in result.output and "prefs/s" in result.output
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"]["prefs"] == 60


@pytest.mark.parametrize(
    "args, message",
    [
        (["--domains", "reviews,movies"], "unknown domain 'movies'"),
        (["--backend", "openai"], "--backend openai needs --model"),
        (["--preset", "quickstart", "--domains", "elix"], "quickstart"),
        (["--backend", "openai", "--model", "m", "--label-noise", "0.1"], "template backend only"),
        (["--from", "x.jsonl"], "--from needs --import"),
        (["--import", "roleplay"], "at least one --from"),
        (["--backend", "hf", "--model", "/nonexistent/model"], "not a Hugging Face model directory"),
    ],
)
def test_bad_arguments(tmp_path, args, message):
    result = invoke("--out", tmp_path / "out", "--no-progress", *args)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output


def test_click_range_errors(tmp_path):
    result = invoke("--out", tmp_path, "--users", 0)
    assert result.exit_code == 2 and "Invalid value for '--users'" in result.output


def test_unreadable_import_file_in_a_real_process(tmp_path):
    src = tmp_path / "review.jsonl"
    src.write_bytes(b'{"prompt": "q"}\n\xff\xfe\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fspo_engine.cli.main",
            "gen-data",
            "--out",
            str(tmp_path / "out"),
            "--import",
            "review",
            "--from",
            str(src),
            "--strict",  # line 1, with no user level, is an error too (by default it is skipped)
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {src}:1: missing field 'scorer_level'",
        f"{src}:2: not valid UTF-8",
    ]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_import_through_the_cli(tmp_path):
    src = tmp_path / "roleplay.jsonl"
    src.write_text(json.dumps({"x": "q", "yw": "a", "yl": "b", "level": 1, "score_persona": "p"}) + "\n")
    result = invoke(
        "--out", tmp_path / "out", "--import", "roleplay", "--from", src, "--import-split", "train"
    )
    assert result.exit_code == 0, result.output
    assert "imported 1 prefs" in result.output


def test_an_identical_import_rerun_has_nothing_to_do(tmp_path):
    src = tmp_path / "roleplay.jsonl"
    src.write_text(json.dumps({"x": "q", "yw": "a", "yl": "b", "level": 1, "score_persona": "p"}) + "\n")
    args = ("--out", tmp_path / "out", "--import", "roleplay", "--from", src)
    assert invoke(*args).exit_code == 0
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output and "imported" not in again.output
