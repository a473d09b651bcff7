"""The AI judge's both-orders rule and persona improvement, with an in-process scripted judge LLM."""

from __future__ import annotations

import asyncio
import re

import pytest

from fspo_engine.data_gen.labeler import Decision, Judge, label_user


class ScriptedLLM:
    """A judge LLM that decides by a keyword rule: the user likes responses whose first word is listed after
    "likes:" in the description; a pair containing "BIASED" always gets "A" (position bias). It answers
    through the client's `chat_json` interface (reply object -> the caller's check), counting requests."""

    def __init__(self):
        self.improve_calls = 0
        self.judge_calls = 0

    async def chat_json(self, messages, *, stage, schema, schema_name, check=None, **_):
        text = messages[-1]["content"]
        if text.startswith("Task: improve persona"):
            self.improve_calls += 1
            a = re.search(r"Response A: (\w+)", text).group(1)
            return check({"trait": f"likes: {a}"})
        self.judge_calls += 1
        desc = re.search(r"User description: (.*)", text).group(1)
        a = re.search(r"Response A: (.*)", text).group(1)
        b = re.search(r"Response B: (.*)", text).group(1)
        liked = set(re.findall(r"likes: (\w+)", desc))
        if "BIASED" in a + b:
            verdict = "A"
        elif a.split()[0] in liked and b.split()[0] not in liked:
            verdict = "A"
        elif b.split()[0] in liked and a.split()[0] not in liked:
            verdict = "B"
        else:
            verdict = "tie"
        return check({"reason": "rule", "preferred": verdict})


def test_decision_kinds_and_entropy():
    assert Decision((1, 1)).kind == "x" and Decision((1, 1)).entropy == 0.0
    assert Decision((-1, -1)).kind == "y"
    assert Decision((1, -1)).kind == "flip" and Decision((1, -1)).entropy == 1.0
    assert Decision((0, 0)).kind == "tie" and Decision((0, 0)).entropy == 1.0
    assert Decision((1, 0)).kind == "tie" and Decision((1, 0)).entropy == pytest.approx(0.8113, abs=1e-4)
    assert Decision(None).kind == "malformed"


def test_persona_improvement_lowers_entropy_on_an_ambiguous_user_and_drops_flips():
    # The description says nothing the judge can use: every honest pair is a tie.
    pairs = [
        ("q1", "apples are best", "bananas are best"),
        ("q2", "cherries win", "apples rule"),
        ("q3", "bananas again", "cherries again"),
        ("q4", "apples BIASED", "figs"),
    ]

    async def go(improve):
        llm = ScriptedLLM()
        labels = await label_user(Judge(llm, "judge"), "A person.", pairs, improve=improve, max_traits=3)
        return llm, labels

    judge, plain = asyncio.run(go(False))
    assert [d.kind for d in plain.decisions] == ["tie", "tie", "tie", "flip"]
    assert sum(plain.entropy_after) / 4 == 1.0 and judge.improve_calls == 0
    assert judge.judge_calls == 8  # both orders of every pair

    judge, improved = asyncio.run(go(True))
    before = sum(improved.entropy_before) / len(improved.entropy_before)
    after = sum(improved.entropy_after) / len(improved.entropy_after)
    assert before == 1.0 and after < before
    # Trait 1 ("likes: apples") decides q1 and q2; trait 2 ("likes: bananas") decides q3; the flip (q4) asks
    # for a trait too, but "likes: apples." is already there and is not added twice. Every pair was then
    # relabelled with the final description, where apples and bananas are both liked.
    assert improved.added_traits == ["likes: apples.", "likes: bananas."] and judge.improve_calls == 3
    assert improved.description == "A person. likes: apples. likes: bananas."
    assert [d.kind for d in improved.decisions] == ["tie", "y", "x", "flip"]
    assert [d.kind for d in improved.first] == ["tie", "tie", "tie", "flip"]
    assert improved.decided_after_refinement == 2
    assert after == pytest.approx(0.5)
    # The kept labels carry both raw verdicts: (x shown first, y shown first).
    assert improved.decisions[1].verdicts == ("B", "A") and improved.decisions[3].verdicts == ("A", "A")
