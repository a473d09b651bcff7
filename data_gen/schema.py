"""Validate a parsed JSON reply against the JSON-schema subset that gen-data's prompts use.

The subset: `type` (object, array, string, integer, number, boolean, null, or a list of them), `enum`,
`const`, `properties`, `required`, `additionalProperties: false`, `items`, `minItems`/`maxItems`,
`minLength`/`maxLength`, `minimum`/`maximum`. That is what structured-output servers (vLLM, SGLang,
OpenAI strict mode) enforce reliably, so the stage schemas keep to it; any other keyword raises, so a
schema cannot silently ask for a check that is not made.

Why not the `jsonschema` package: it pulls in `rpds-py` (a compiled Rust wheel) through `referencing`,
plus `attrs` and `jsonschema-specifications`, for $ref resolution and format checkers we never use; the
subset above is ~60 lines and its error messages name the path the way our warning lines want.
"""

from __future__ import annotations

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    # bool is an int in Python but not in JSON: True is not a valid "integer".
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_KNOWN = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems",
          "maxItems", "minLength", "maxLength", "minimum", "maximum", "description", "title"}


def validate(instance, schema: dict, path: str = "$") -> None:
    """Raise ValueError("<path>: <reason>") at the first place `instance` breaks `schema`."""
    unknown = set(schema) - _KNOWN
    if unknown:
        raise ValueError(f"{path}: the schema uses unsupported keywords {sorted(unknown)}")
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPES[k](instance) for k in kinds):
            raise ValueError(f"{path}: expected {' or '.join(kinds)}, got {_json_type(instance)}")
    if "const" in schema and instance != schema["const"]:
        raise ValueError(f"{path}: must be {schema['const']!r}")
    if "enum" in schema and not any(_same(instance, e) for e in schema["enum"]):
        raise ValueError(f"{path}: {_short(instance)} is not one of {schema['enum']}")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in instance:
                raise ValueError(f"{path}: missing required property {name!r}")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(instance) - set(props))
            if extra:
                raise ValueError(f"{path}: unexpected properties {extra}")
        for name, sub in props.items():
            if name in instance:
                validate(instance[name], sub, f"{path}.{name}")
    elif isinstance(instance, list):
        _bounds(len(instance), schema.get("minItems"), schema.get("maxItems"), path, "items")
        if "items" in schema:
            for i, item in enumerate(instance):
                validate(item, schema["items"], f"{path}[{i}]")
    elif isinstance(instance, str):
        _bounds(len(instance), schema.get("minLength"), schema.get("maxLength"), path, "characters")
    elif _TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            raise ValueError(f"{path}: {instance} is below the minimum {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            raise ValueError(f"{path}: {instance} is above the maximum {schema['maximum']}")


def _bounds(n: int, lo, hi, path: str, what: str) -> None:
    if lo is not None and n < lo:
        raise ValueError(f"{path}: {n} {what}, at least {lo} required")
    if hi is not None and n > hi:
        raise ValueError(f"{path}: {n} {what}, at most {hi} allowed")


def _same(a, b) -> bool:
    return a == b and type(a) is type(b) or (_TYPES["number"](a) and _TYPES["number"](b) and a == b)


def _json_type(v) -> str:
    return next((k for k in ("null", "boolean", "integer", "number", "string", "array", "object") if _TYPES[k](v)),
                type(v).__name__)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
