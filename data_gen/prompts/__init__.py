"""The LLM stages' prompts (one text file per stage, beside this module) and their reply schemas.

A prompt file holds a `[system]` and a `[user]` section; `$name` fields are filled with
`string.Template` (so the JSON examples' braces need no escaping). The user message's first line,
"Task: <stage>", names the request kind in server logs and for test doubles.

Stages whose reply is parsed come with a JSON schema: the client sends it as
`response_format={"type": "json_schema", ...}` (vLLM, SGLang and OpenAI constrain decoding to it) and
validates the reply against it; the `check_*` functions then clean the value and reject what a schema
cannot express (blank strings, duplicates), raising ValueError(reason), which the client turns into a
retry and finally a counted MalformedReply. Response stages are free text: no schema, no JSON.
"""

from __future__ import annotations

import functools
from importlib import resources
from string import Template


@functools.cache
def _template(stage: str) -> tuple[Template, Template]:
    text = resources.files(__package__).joinpath(f"{stage}.txt").read_text(encoding="utf-8")
    _, _, rest = text.partition("[system]\n")
    system, _, user = rest.partition("[user]\n")
    return Template(system.strip()), Template(user.strip())


def messages(stage: str, **fields: object) -> list[dict]:
    """The chat messages of `stage` with its `$fields` filled in (every field must be given)."""
    system, user = _template(stage)
    return [
        {"role": "system", "content": system.substitute(fields)},
        {"role": "user", "content": user.substitute(fields)},
    ]


def _text(minimum: int = 1, maximum: int = 4000) -> dict:
    return {"type": "string", "minLength": minimum, "maxLength": maximum}


def _object(**props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


# --- reply schemas (the `response_format` of each parsed stage) --------------------------------------------
PERSONA_SCHEMA = _object(description=_text(20, 2000))
VIEWS_SCHEMA = _object(fits=_text(2, 600), contrast=_text(2, 600))
JUDGE_SCHEMA = _object(reason=_text(0, 600), preferred={"type": "string", "enum": ["A", "B", "tie"]})
IMPROVE_SCHEMA = _object(trait=_text(2, 300))


def questions_schema(count: int) -> dict:
    items = {"type": "array", "items": _text(8, 400), "minItems": count, "maxItems": count}
    return _object(questions=items)


def shared_views_schema(count: int) -> dict:
    return _object(views={"type": "array", "items": _text(2, 400), "minItems": count, "maxItems": count})


def clean(text: str) -> str:
    """Whitespace collapsed: replies differ in line breaks and padding, never in meaning."""
    return " ".join(text.split())


def _nonblank(value: str, what: str) -> str:
    value = clean(value)
    if not value:
        raise ValueError(f'"{what}" is blank')
    return value


def check_persona(obj: dict) -> str:
    return _nonblank(obj["description"], "description")


def check_views(obj: dict) -> tuple[str, str]:
    fits, contrast = _nonblank(obj["fits"], "fits"), _nonblank(obj["contrast"], "contrast")
    if fits == contrast:
        raise ValueError('"fits" and "contrast" are the same approach')
    return fits, contrast


def check_verdict(obj: dict) -> str:
    return obj["preferred"]


def check_trait(obj: dict) -> str:
    value = _nonblank(obj["trait"], "trait")
    return value if value.endswith((".", "!", "?")) else value + "."


def check_list(key: str):
    """Clean, non-blank, distinct strings of `obj[key]` (a batch with repeats keeps its first of each)."""

    def check(obj: dict) -> list[str]:
        out: list[str] = []
        for value in (clean(v) for v in obj[key]):
            if value and value not in out:
                out.append(value)
        if not out:
            raise ValueError(f'"{key}" holds no usable item')
        return out

    return check


def check_response(text: str) -> str:
    """A free-text response: the text, cleaned of surrounding whitespace; blank is malformed."""
    value = text.strip()
    if not value:
        raise ValueError("empty response")
    return value


__all__ = [
    "IMPROVE_SCHEMA",
    "JUDGE_SCHEMA",
    "PERSONA_SCHEMA",
    "VIEWS_SCHEMA",
    "check_list",
    "check_persona",
    "check_response",
    "check_trait",
    "check_verdict",
    "check_views",
    "clean",
    "messages",
    "questions_schema",
    "shared_views_schema",
]
