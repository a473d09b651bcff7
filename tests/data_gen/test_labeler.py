"""The AI judge's both-orders rule and persona improvement, with an in-process scripted backend."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from fspo_engine.data_gen.backends import ChatBackend, Reply
from fspo_engine.data_gen.labeler import Decision, label_user


class ScriptedJudge(ChatBackend):
    """A judge that decides by a keyword rule: the user likes responses mentioning any word listed
    after "likes:" in the description; a pair containing "BIASED" always gets "A" (position bias)."""

    def __init__(self):
        super().__init__("scripted", cache_dir=None)
        self.improve_calls = 0

    async def _call(self, request):
        text = request["messages"][-1]["content"]
        if text.startswith("Task: improve persona"):
            self.improve_calls += 1
            a = re.search(r"Response A: (\w+)", text).group(1)
            return Reply(json.dumps({"trait": f"likes: {a}"}))
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
        return Reply(json.dumps({"reason": "rule", "preferred": verdict}))


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
        judge = ScriptedJudge()
        labels = await label_user(judge, "A person.", pairs, improve=improve, max_traits=3)
        return judge, labels

    judge, plain = asyncio.run(go(False))
    assert [d.kind for d in plain.decisions] == ["tie", "tie", "tie", "flip"]
    assert sum(plain.entropy_after) / 4 == 1.0 and judge.improve_calls == 0

    judge, improved = asyncio.run(go(True))
    before = sum(improved.entropy_before) / len(improved.entropy_before)
    after = sum(improved.entropy_after) / len(improved.entropy_after)
    assert before == 1.0 and after < before
    # Trait 1 ("likes: apples") decides q1 and q2; trait 2 ("likes: bananas") decides q3; every pair was
    # then relabelled with the final description, where apples and bananas are both liked.
    assert improved.added_traits == ["likes: apples.", "likes: bananas."]
    assert improved.description == "A person. likes: apples. likes: bananas."
    assert [d.kind for d in improved.decisions] == ["tie", "y", "x", "flip"]
    assert after == pytest.approx(0.5)
