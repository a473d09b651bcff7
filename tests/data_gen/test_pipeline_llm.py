"""gen-data on an LLM, end to end, against fspo_engine.benchmarks.fake_openai on 127.0.0.1 (no weights anywhere).

The built-in fake answers a json_schema request with an instance of the schema (words drawn from a hash of
the request) and free text with words: no rule knows our prompts. Scripted judges (hooks) read the judge
prompt: a persona-aware one, a persona-blind one and a position-biased one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fspo_engine.benchmarks.fake_openai import FakeOpenAI, default_answer, spawn
from fspo_engine.data_gen import generate_dataset
from fspo_engine.data_gen.errors import DataGenError
from fspo_engine.data_gen.pipeline import format_summary

CLI = [sys.executable, "-m", "fspo_engine.cli.main", "gen-data"]
FILES = ("users.jsonl", "prefs.jsonl", "manifest.json", "questions.jsonl")


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def judge_fields(body: dict) -> dict | None:
    """The judge prompt's fields, or None for another kind of request."""
    text = body["messages"][-1]["content"]
    if not text.startswith("Task: judge"):
        return None
    get = lambda name: re.search(rf"^{name}: (.*)$", text, re.M).group(1)  # noqa: E731
    return {"description": get("User description"), "question": get("Question"), "a": get("Response A"),
            "b": get("Response B")}


def verdict(preferred: str) -> str:
    return json.dumps({"reason": "scripted", "preferred": preferred})


def persona_aware(body: dict):
    """Prefers the response whose hash with the description is larger: consistent in both orders, and a
    different user often prefers the other side."""
    f = judge_fields(body)
    if f is None:
        return None
    return verdict("A" if _h(f["description"], f["a"]) > _h(f["description"], f["b"]) else "B")


def persona_blind(body: dict):
    f = judge_fields(body)
    if f is None:
        return None
    return verdict("A" if _h(f["a"]) > _h(f["b"]) else "B")


def position_biased(body: dict):
    return verdict("A") if judge_fields(body) is not None else None


def run(fake: FakeOpenAI, out: Path, **options):
    args = dict(backend="openai", model="m", base_url=fake.base_url, users=12, prefs_per_user=4, seed=0,
                concurrency=32, progress=False, backoff_s=0.0)
    return generate_dataset(out, **{**args, **options})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_contract_command_writes_llm_users_questions_and_answers(tmp_path):
    with FakeOpenAI(answer=persona_aware) as fake:
        out = tmp_path / "d"
        cmd = [*CLI, "--backend", "openai", "--base-url", fake.base_url, "--model", "m", "--personas", "llm",
               "--questions", "llm", "--users", "16", "--prefs-per-user", "5", "--concurrency", "32", "--seed", "3",
               "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        seen = list(fake.seen)
    for name in FILES:
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    labels, div = manifest["stats"]["labels"], manifest["stats"]["diversity"]
    assert isinstance(labels["persona_swap_change_rate"], float)
    users, prefs = read(out / "users.jsonl"), read(out / "prefs.jsonl")
    assert len(prefs) >= 40 and manifest["counts"]["prefs"] == len(prefs)
    # Users written by the LLM from many sampled traits, all different.
    descriptions = [u["description"] for u in users]
    assert len(set(descriptions)) == len(descriptions) == div["distinct_personas"]
    assert all(len(u["traits"]) >= 15 for u in users)
    # Responses written for each (user, question): no sharing across users.
    responses = {p["chosen"] for p in prefs} | {p["rejected"] for p in prefs}
    assert len(responses) >= 0.9 * 2 * len(prefs) and div["distinct_responses"] == len(responses)
    questions = read(out / "questions.jsonl")
    assert len({q["question"] for q in questions}) == len(questions) >= 16 * 5 // 5
    # Provenance on every pref.
    assert all(p["generator_model"] == "m" and p["judge_model"] == "m" and p["label"] == "judge" for p in prefs)
    assert all(set(p["verdicts"]) == {"chosen_first", "rejected_first"} for p in prefs)
    assert all(p["verdicts"]["chosen_first"] == "A" and p["verdicts"]["rejected_first"] == "B" for p in prefs)
    # Parsed stages ask for a json_schema reply; responses are free text.
    kinds = {}
    for body in seen:
        if "messages" not in body:
            continue
        task = body["messages"][-1]["content"].splitlines()[0]
        fmt = body.get("response_format")
        kinds.setdefault(task, set()).add(fmt["type"] if fmt else None)
        if fmt:
            assert fmt["json_schema"]["name"] and fmt["json_schema"]["schema"]["type"] == "object"
        assert isinstance(body.get("seed"), int)
    assert kinds["Task: persona"] == kinds["Task: questions"] == kinds["Task: views"] == {"json_schema"}
    assert kinds["Task: judge"] == {"json_schema"} and kinds["Task: respond"] == {None}
    # Every judged pair was asked in both orders.
    asked = {(f["description"], f["a"], f["b"]) for f in map(judge_fields, seen) if f}
    assert asked and all((d, b, a) in asked for d, a, b in asked)
    stats = json.loads((out / "gen_stats.json").read_text())
    for stage in ("personas", "questions", "views", "responses", "judge"):
        assert set(stats["stages"][stage]) >= {"requests", "cache_hits", "malformed", "retries", "tokens_in",
                                               "tokens_out", "latency_p50_s", "latency_p95_s", "mean_inflight",
                                               "wall_s", "req_per_s"}


def test_distinct_questions_grow_with_users(tmp_path):
    with FakeOpenAI(answer=persona_aware) as fake:
        small = run(fake, tmp_path / "a", users=6).manifest["stats"]["diversity"]["distinct_questions"]
        large = run(fake, tmp_path / "b", users=24).manifest["stats"]["diversity"]["distinct_questions"]
    assert large >= 3 * small


def test_a_persona_blind_judge_gives_no_swap_changes_and_a_warning(tmp_path):
    with FakeOpenAI(answer=persona_blind) as fake:
        result = run(fake, tmp_path / "d", users=24, swap_control_fraction=0.5)
    labels = result.manifest["stats"]["labels"]
    assert labels["persona_swap_pairs"] >= 10 and labels["persona_swap_change_rate"] == 0.0
    assert "warning: labels barely depend on the user" in format_summary(result)


def test_a_persona_aware_judge_changes_under_another_persona(tmp_path):
    with FakeOpenAI(answer=persona_aware) as fake:
        result = run(fake, tmp_path / "d", users=24, swap_control_fraction=0.5)
    labels = result.manifest["stats"]["labels"]
    assert labels["persona_swap_pairs"] >= 10 and 0.25 < labels["persona_swap_change_rate"] < 0.75
    assert labels["position_flip_rate"] == 0.0
    assert "barely depend" not in format_summary(result)


def test_a_position_biased_judge_is_caught(tmp_path):
    with FakeOpenAI(answer=position_biased) as fake:
        with pytest.raises(DataGenError, match="no preferences were generated"):
            run(fake, tmp_path / "d", users=6, max_traits=1)
    # Every pair flips with the order: persona refinement cannot help, nothing is kept. With a mixed judge the
    # rate is reported (and warned about) in a dataset that keeps the consistent pairs.
    def mixed(body):
        f = judge_fields(body)
        return None if f is None else (position_biased(body) if _h(*sorted((f["a"], f["b"]))) % 2 else persona_aware(body))

    with FakeOpenAI(answer=mixed) as fake:
        result = run(fake, tmp_path / "m", users=16, persona_improvement=False)
    labels = result.manifest["stats"]["labels"]
    assert 0.3 < labels["position_flip_rate"] < 0.7
    assert labels["dropped_flip"] > 0 and "position-biased" in format_summary(result)


def test_undecided_pairs_refine_the_persona_and_every_label_is_rejudged(tmp_path):
    # Ties unless the description holds an added trait; the improve stage adds one (the fake's schema
    # instance), after which the persona-aware rule decides.
    def tie_until_refined(body):
        f = judge_fields(body)
        if f is None:
            return None
        return persona_aware(body) if "REFINED" in f["description"] else verdict("tie")

    def improve(body):
        text = body["messages"][-1]["content"]
        if text.startswith("Task: improve persona"):
            return json.dumps({"trait": f"REFINED {_h(text) % 1000}"})
        return tie_until_refined(body)

    with FakeOpenAI(answer=improve) as fake:
        result = run(fake, tmp_path / "d", users=8, max_traits=2)
    labels = result.manifest["stats"]["labels"]
    users = read(tmp_path / "d" / "users.jsonl")
    assert labels["label_entropy_before"] == 1.0 and labels["label_entropy_after"] == 0.0
    assert labels["decided_after_refinement_rate"] == 1.0 and labels["users_refined"] == 8
    assert all(1 <= len(u["added_traits"]) <= 2 and u["description"].startswith(u["persona"]) for u in users)
    assert all(all(t in u["description"] for t in u["added_traits"]) for u in users)


def test_bad_replies_are_counted_and_never_crash_the_run(tmp_path):
    def flaky(body):
        text = body["messages"][-1]["content"]
        fmt = body.get("response_format")
        r = _h(text, str(body.get("seed"))) % 10
        if fmt and r == 0:
            return "this is not JSON {"
        if fmt and r == 1:
            return json.dumps({"unexpected": "shape"})
        if r == 2:
            return ""
        return persona_aware(body) or default_answer(body)

    with FakeOpenAI(answer=flaky) as fake:
        result = run(fake, tmp_path / "d", users=12)
    stats = json.loads((tmp_path / "d" / "gen_stats.json").read_text())
    malformed = {k: v["malformed"] for k, v in stats["stages"].items()}
    assert malformed["judge"] > 0 and malformed["responses"] > 0 and malformed["views"] > 0
    assert stats["total"]["malformed"] == sum(malformed.values())
    assert result.manifest["counts"]["prefs"] > 0


def test_min_prefs_per_user_drops_and_counts_users(tmp_path):
    def some_ties(body):  # a quarter of the pairs cannot be decided (and no refinement is asked for)
        f = judge_fields(body)
        return None if f is None else verdict("tie") if _h(*sorted((f["a"], f["b"]))) % 4 == 0 else persona_aware(body)

    with FakeOpenAI(answer=some_ties) as fake:
        result = run(fake, tmp_path / "d", users=16, prefs_per_user=4, min_prefs_per_user=3,
                     persona_improvement=False)
    labels = result.manifest["stats"]["labels"]
    users, prefs = read(tmp_path / "d" / "users.jsonl"), read(tmp_path / "d" / "prefs.jsonl")
    per_user = {u["user_id"]: sum(p["user_id"] == u["user_id"] for p in prefs) for u in users}
    assert all(n >= 3 for n in per_user.values())
    assert labels["users_dropped_few_prefs"] > 0 and len(users) + labels["users_dropped_few_prefs"] == 16
    hist = labels["kept_prefs_per_user_histogram"]
    assert sum(hist.values()) == 16 and hist.get("3", 0) + hist.get("4", 0) == len(users)
    assert labels["kept"] == len(prefs) and labels["labelled"] == sum(int(k) * v for k, v in hist.items())


def test_near_duplicate_personas_are_redrawn(tmp_path):
    # The "model" writes a persona from the age alone, with one varying word: users of the same age come out
    # nearly identical (not exactly), and must be redrawn with new traits.
    def ages(body):
        text = body["messages"][-1]["content"]
        if not text.startswith("Task: persona"):
            return persona_aware(body)
        age = re.search(r"- age: (.*)", text).group(1)
        tail = ["kind", "calm", "busy"][_h(text) % 3]
        return json.dumps({"description": f"This user is {age} years old and likes long detailed honest careful "
                                          f"answers about products they buy every single week and is {tail}"})

    with FakeOpenAI(answer=ages) as fake:
        result = run(fake, tmp_path / "d", users=10, prefs_per_user=2, min_prefs_per_user=0)
    users = read(tmp_path / "d" / "users.jsonl")
    ages_seen = [re.search(r"is (.*) years", u["persona"]).group(1) for u in users]
    assert len(set(ages_seen)) == len(ages_seen)  # no two kept personas share the age, i.e. near-duplicates
    assert result.manifest["stats"]["labels"]["users_dropped_persona"] + len(users) == 10


def test_user_files_for_personas_and_questions(tmp_path):
    personas = tmp_path / "personas.jsonl"
    personas.write_text("".join(json.dumps({"description": f"Person {i} likes {w}.", "traits": {"w": w}}) + "\n"
                                for i, w in enumerate(["tea", "maps", "jazz", "chess", "rain", "salt"])))
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "What should I cook tonight?"}) + "\n"
                         + json.dumps({"question": "Which phone should I buy?", "domain": "reviews"}) + "\n")
    with FakeOpenAI(answer=persona_aware) as fake:
        run(fake, tmp_path / "d", users=6, prefs_per_user=2, personas=str(personas), questions=str(questions),
            min_prefs_per_user=0)
        users = read(tmp_path / "d" / "users.jsonl")
        assert {u["description"] for u in users} <= {json.loads(x)["description"] for x in personas.read_text().split("\n") if x}
        assert {q["question"] for q in read(tmp_path / "d" / "questions.jsonl")} == {
            "What should I cook tonight?", "Which phone should I buy?"}
        gen = json.loads((tmp_path / "d" / "manifest.json").read_text())["generator"]
        assert gen["personas"] == "file" and len(gen["personas_sha256"]) == 64
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"description": "ok"}) + "\n" + json.dumps({"traits": {}}) + "\n")
        with pytest.raises(DataGenError, match=rf"{re.escape(str(bad))}:2: field 'description'"):
            run(fake, tmp_path / "e", users=1, personas=str(bad))
        with pytest.raises(DataGenError, match="holds 6 personas, fewer than --users 7"):
            run(fake, tmp_path / "f", users=7, personas=str(personas))
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_a_persona_schema_file_replaces_the_built_in_one(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"traits": {"hobby": ["knitting", "surfing"], "pet": ["cat", "dog", "owl"]},
                                  "domains": {"reviews": {"topics": ["yarn"], "about": "yarn reviews"}}}))
    with FakeOpenAI(answer=persona_aware) as fake:
        run(fake, tmp_path / "d", users=4, prefs_per_user=2, persona_schema=str(schema), min_prefs_per_user=0)
        prompts = [s["messages"][-1]["content"] for s in fake.seen if "messages" in s]
    users = read(tmp_path / "d" / "users.jsonl")
    assert all(set(u["traits"]) == {"hobby", "pet"} for u in users)
    assert any("Topic: yarn" in p for p in prompts) and any("Domain: yarn reviews" in p for p in prompts)
    schema.write_text('{"traits": {"hobby": []}}')
    with pytest.raises(DataGenError, match="traits.hobby must be a non-empty list"):
        generate_dataset(tmp_path / "e", backend="openai", model="m", base_url="http://127.0.0.1:9/v1", users=2,
                         persona_schema=str(schema), progress=False)


def test_random_labels_keep_the_texts_and_flip_coins(tmp_path):
    with FakeOpenAI(answer=persona_aware) as fake:
        run(fake, tmp_path / "s", users=12, prefs_per_user=6, min_prefs_per_user=0)
        result = run(fake, tmp_path / "r", users=12, prefs_per_user=6, min_prefs_per_user=0,
                     ablation="random-labels")
    assert result.manifest["generator"]["ablation"] == "random-labels"
    structured = {p["pref_id"]: p for p in read(tmp_path / "s" / "prefs.jsonl")}
    random_ = {p["pref_id"]: p for p in read(tmp_path / "r" / "prefs.jsonl")}
    assert set(structured) <= set(random_)  # the ablation keeps every pair (no judge to drop one)
    same = [random_[k]["chosen"] == p["chosen"] for k, p in structured.items()]
    assert all({random_[k]["chosen"], random_[k]["rejected"]} == {p["chosen"], p["rejected"]}
               for k, p in structured.items())
    assert 0.2 < sum(same) / len(same) < 0.8  # a coin, not the judge
    assert all(p["label"] == "random" and p["verdicts"] is None for p in random_.values())


def test_template_presets_take_the_random_labels_ablation(tmp_path):
    plain = generate_dataset(tmp_path / "a", preset="quickstart", users=50, progress=False)
    abl = generate_dataset(tmp_path / "b", preset="quickstart", users=50, progress=False, ablation="random-labels")
    a, b = read(tmp_path / "a" / "prefs.jsonl"), read(tmp_path / "b" / "prefs.jsonl")
    assert [(p["question"], {p["chosen"], p["rejected"]}) for p in a] == [(p["question"], {p["chosen"], p["rejected"]}) for p in b]
    flips = sum(x["chosen"] != y["chosen"] for x, y in zip(a, b)) / len(a)
    assert 0.4 < flips < 0.6
    assert abl.manifest["generator"]["ablation"] == "random-labels" and "ablation" not in plain.manifest["generator"]
    assert read(tmp_path / "a" / "users.jsonl") == read(tmp_path / "b" / "users.jsonl")


def test_same_seed_and_a_warm_cache_give_the_same_bytes(tmp_path):
    with FakeOpenAI(answer=persona_aware) as fake:
        run(fake, tmp_path / "a", users=10)
        n = fake.stats()["requests"]
        run(fake, tmp_path / "b", users=10, cache_dir=str(tmp_path / "a" / ".llm-cache"))
        assert fake.stats()["requests"] == n  # every reply from the cache
        run(fake, tmp_path / "c", users=10)  # a cold cache: the server answers the same seeded requests alike
    for name in FILES:
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    assert sorted(os.listdir(tmp_path / "a" / ".llm-cache"))[:1] == ["replies.sqlite"]
    assert len(os.listdir(tmp_path / "a" / ".llm-cache")) <= 4


@pytest.mark.slow
def test_kill_9_then_the_same_command_gives_the_same_bytes(tmp_path):
    with spawn(delay_s=0.05) as fake:
        def cmd(out):
            return [*CLI, "--backend", "openai", "--base-url", fake.base_url, "--model", "m", "--users", "40",
                    "--prefs-per-user", "5", "--concurrency", "32", "--seed", "5", "--out", str(out),
                    "--commit-every-s", "0.3", "--no-progress"]

        t = time.monotonic()
        subprocess.run(cmd(tmp_path / "a"), check=True, capture_output=True, timeout=300)
        full = time.monotonic() - t
        before = fake.stats()["requests"]
        proc = subprocess.Popen(cmd(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full / 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = json.loads((tmp_path / "b" / ".gen-state" / "state.json").read_text())
        assert 0 < state["done"] < 40
        subprocess.run(cmd(tmp_path / "b"), check=True, capture_output=True, timeout=300)
        second = fake.stats()["requests"] - before
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    stats = json.loads((tmp_path / "b" / "gen_stats.json").read_text())
    # The killed invocation's figures are those of its last commit: what it sent after that is not in them.
    assert len(stats["invocations"]) == 2 and 0.8 * second <= stats["requests"] <= 1.05 * second
    # What the kill cost: the requests asked again, a small share of the run.
    assert stats["requests_lost_to_kill"] <= 0.25 * before


@pytest.mark.slow
def test_kill_9_before_the_first_commit_then_resume(tmp_path):
    """Killed before any commit (the default 30 s window): the appended, uncommitted users are dropped and
    the re-run replays none of their personas (it once waited forever for a persona turn that had moved)."""
    with spawn(delay_s=0.05) as fake:
        def cmd(out):
            return [*CLI, "--backend", "openai", "--base-url", fake.base_url, "--model", "m", "--users", "80",
                    "--prefs-per-user", "4", "--concurrency", "32", "--seed", "6", "--out", str(out), "--no-progress"]

        subprocess.run(cmd(tmp_path / "a"), check=True, capture_output=True, timeout=300)
        total = fake.stats()["requests"]
        fake.reset_stats()
        proc = subprocess.Popen(cmd(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while fake.stats()["requests"] < total * 3 // 4 and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = json.loads((tmp_path / "b" / ".gen-state" / "state.json").read_text())
        # Nothing committed, but more than a write buffer of users appended (what the re-run must drop).
        assert state["done"] == 0 and (tmp_path / "b" / ".gen-state" / "personas.jsonl").stat().st_size > 0
        subprocess.run(cmd(tmp_path / "b"), check=True, capture_output=True, timeout=120)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.slow
def test_two_servers_one_killed_mid_run_loses_nothing(tmp_path):
    with FakeOpenAI(answer=persona_aware) as one:
        run(one, tmp_path / "ref", users=16)
    a, b = FakeOpenAI(answer=persona_aware, delay_s=0.02), FakeOpenAI(answer=persona_aware, delay_s=0.02)
    with a, b:
        import threading

        threading.Timer(1.0, b.kill).start()
        result = run(a, tmp_path / "d", users=16, base_url=f"{a.base_url},{b.base_url}")
        served = a.stats()["answered"], b.stats()["answered"]
    assert served[1] > 0 and served[0] > 0
    for name in FILES:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "d" / name).read_bytes(), name
    assert result.gen_stats["servers"][b.base_url]["down"] is True


@pytest.mark.slow
def test_the_pipeline_keeps_the_servers_full(tmp_path):
    # A ratio, not a time: the share of the cap in flight over the server's busy span (issue 23's contract
    # measure). The latency is long enough that the client's CPU does not decide it on 2 busy cores.
    with FakeOpenAI(answer=persona_aware, delay_s=0.25) as fake:
        run(fake, tmp_path / "d", users=48, prefs_per_user=5, concurrency=32, max_traits=1)
        mean = fake.stats()["mean_inflight"]
    assert mean >= 0.75 * 32, mean


# --- failure modes (the gen-data red-team findings, on the new client) ------------------------------------
def test_the_api_key_is_sent_and_written_nowhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SECRET_KEY", "sk-test-secret-4242")
    with FakeOpenAI(answer=persona_aware) as fake:
        run(fake, tmp_path / "d", users=4, api_key_env="FAKE_SECRET_KEY")
        assert "Bearer sk-test-secret-4242" in fake.auth_headers
    for path in (tmp_path / "d").rglob("*"):
        if path.is_file():
            assert b"sk-test-secret" not in path.read_bytes(), path
    assert "sk-test-secret" not in capsys.readouterr().err


def test_every_reply_malformed_is_one_clear_error_and_leaves_nothing(tmp_path):
    with FakeOpenAI(answer=lambda body: "no json here") as fake:
        with pytest.raises(DataGenError, match="no usable question for domain 'reviews'"):
            run(fake, tmp_path / "d", users=2)
        with pytest.raises(DataGenError, match="no preferences were generated; first problem: views: "):
            run(fake, tmp_path / "t", users=2, questions="template", personas="template")
    assert not (tmp_path / "d").exists() and not (tmp_path / "t").exists()


def test_a_run_against_a_broken_server_can_be_rerun_once_it_is_fixed(tmp_path):
    with FakeOpenAI(answer=persona_aware) as fake:
        fake.script = [500] * 1000
        with pytest.raises(DataGenError, match=r"request failed after 1 tries \(last: HTTP 500"):
            run(fake, tmp_path / "d", users=3, max_retries=0)
        assert not (tmp_path / "d").exists()  # nothing was generated: no state, no directory
        fake.script = []
        assert run(fake, tmp_path / "d", users=3, max_retries=0).manifest["counts"]["prefs"] > 0


def test_transient_failures_do_not_change_the_bytes(tmp_path):
    with FakeOpenAI(answer=persona_aware) as fake:
        run(fake, tmp_path / "a", users=6)
        fake.script = [429, 500, "reset", 503]
        run(fake, tmp_path / "b", users=6)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    stats = json.loads((tmp_path / "b" / "gen_stats.json").read_text())
    assert stats["total"]["retries"] >= 4


def test_a_failed_start_leaves_no_state(tmp_path):
    with pytest.raises(DataGenError, match="not a Hugging Face model directory"):
        generate_dataset(tmp_path / "hf", backend="hf", model=str(tmp_path / "nonexistent"), progress=False)
    assert not (tmp_path / "hf").exists()
    with FakeOpenAI(answer=persona_aware, models=["m"]) as fake:
        with pytest.raises(DataGenError, match=r"refused the request \(404\)"):
            run(fake, tmp_path / "oa", model="typo")
        assert not (tmp_path / "oa").exists()
        (tmp_path / "oa").mkdir()  # an existing, empty --out stays, and stays empty
        with pytest.raises(DataGenError, match=r"refused the request \(404\)"):
            run(fake, tmp_path / "oa", model="typo")
        assert list((tmp_path / "oa").iterdir()) == []
        run(fake, tmp_path / "oa", users=2)  # the corrected command just runs


def test_no_base_url_names_the_server_the_sdk_uses(tmp_path, monkeypatch):
    from fspo_engine.data_gen.config import GenConfig

    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens on port 9
    with pytest.raises(DataGenError, match=r"http://127.0.0.1:9/v1"):
        generate_dataset(tmp_path / "out", backend="openai", model="m", users=2, max_retries=0, timeout_s=3.0,
                         progress=False, backoff_s=0.0)
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert GenConfig(backend="openai", model="m").resolved().base_url == "https://api.openai.com/v1"


@pytest.mark.parametrize("mode", ["views", "both", "persona"])
def test_the_older_response_modes_and_model_routing(tmp_path, mode):
    with FakeOpenAI(answer=persona_aware) as fake:
        result = run(fake, tmp_path / "d", users=6, prefs_per_user=3, candidates=3, response_mode=mode,
                     gen_models=("g1", "g2"), judge_model="judge", min_prefs_per_user=0)
        by_model: dict[str, set] = {}
        for body in fake.seen:
            by_model.setdefault(body["model"], set()).add(body["messages"][-1]["content"].splitlines()[0])
    assert result.manifest["generator"]["gen_models"] == ["g1", "g2"]
    assert by_model["judge"] <= {"Task: judge", "Task: improve persona"} and "Task: judge" in by_model["judge"]
    assert by_model["g2"] == {"Task: respond"}  # the second generator writes responses only
    prefs = read(tmp_path / "d" / "prefs.jsonl")
    assert prefs and all(p["generator_model"] == ["g1", "g2"] and p["judge_model"] == "judge" for p in prefs)
    if mode == "views":  # one set of views per question, shared by every user
        questions = {p["question"] for p in prefs}
        shared = {(p["question"], r) for p in prefs for r in (p["chosen"], p["rejected"])}
        assert len({r for _, r in shared}) <= 3 * len(questions)
