"""data_gen/schema.py: the JSON-schema subset gen-data validates replies with."""

from __future__ import annotations

import random

import pytest

from fspo_engine.benchmarks.fake_openai import instance
from fspo_engine.data_gen.schema import validate

VERDICT = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "minLength": 1, "maxLength": 400},
        "preferred": {"type": "string", "enum": ["A", "B", "tie"]},
    },
    "required": ["reason", "preferred"],
    "additionalProperties": False,
}
QUESTIONS = {
    "type": "object",
    "properties": {
        "questions": {"type": "array", "items": {"type": "string", "minLength": 5}, "minItems": 2, "maxItems": 4},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "note": {"type": ["string", "null"]},
    },
    "required": ["questions"],
}


def test_valid_instances_pass():
    validate({"reason": "short", "preferred": "tie"}, VERDICT)
    validate({"questions": ["what is up", "how do I"], "count": 3, "score": 1, "ok": True, "note": None}, QUESTIONS)
    validate({"questions": ["hello there", "a b c d e"], "extra": 1}, QUESTIONS)  # extra allowed here


@pytest.mark.parametrize(
    "obj, schema, message",
    [
        ([], VERDICT, r"^\$: expected object, got array$"),
        ({"reason": "x"}, VERDICT, r"^\$: missing required property 'preferred'$"),
        ({"reason": "x", "preferred": "C"}, VERDICT, r"^\$\.preferred: 'C' is not one of \['A', 'B', 'tie'\]$"),
        ({"reason": "", "preferred": "A"}, VERDICT, r"^\$\.reason: 0 characters, at least 1 required$"),
        ({"reason": "x", "preferred": "A", "why": 1}, VERDICT, r"unexpected properties \['why'\]"),
        ({"questions": ["hello there"]}, QUESTIONS, r"^\$\.questions: 1 items, at least 2 required$"),
        ({"questions": ["hello there", "hi"]}, QUESTIONS, r"^\$\.questions\[1\]: 2 characters"),
        ({"questions": ["hello", "there"], "count": True}, QUESTIONS, r"\$\.count: expected integer, got boolean"),
        ({"questions": ["hello", "there"], "count": 10}, QUESTIONS, r"above the maximum 9"),
        ({"questions": ["hello", "there"], "count": 1.5}, QUESTIONS, r"expected integer, got number"),
        ({"questions": ["hello", "there"], "score": "1"}, QUESTIONS, r"expected number, got string"),
        ({"questions": ["hello", "there"], "note": 3}, QUESTIONS, r"expected string or null, got integer"),
        (None, VERDICT, r"expected object, got null"),
    ],
)
def test_violations_name_the_path_and_reason(obj, schema, message):
    with pytest.raises(ValueError, match=message):
        validate(obj, schema)


def test_enum_does_not_confuse_bool_and_int():
    with pytest.raises(ValueError):
        validate(True, {"enum": [1, 2]})
    validate(1, {"enum": [1.0]})


def test_unsupported_keywords_are_refused_not_ignored():
    with pytest.raises(ValueError, match=r"unsupported keywords \['pattern'\]"):
        validate("abc", {"type": "string", "pattern": "^a"})


def test_the_fake_servers_instances_validate():
    rng = random.Random(0)
    for schema in (VERDICT, QUESTIONS):
        for _ in range(200):
            validate(instance(schema, rng), schema)
