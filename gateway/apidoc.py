"""Request body schemas of the OpenAPI document, made from the wire models themselves.

Adapters whose bodies are pydantic models (:class:`gateway.events.Wire`) register
them with :func:`component`; the app adds every registered schema (and the
models it refers to) to ``components.schemas``, so the document describes
exactly what the route validates. :func:`has` writes the rules a model cannot
express (a path the body must have), :func:`json_body` a route's required JSON body,
:func:`form_body` a carrier webhook's form body and :data:`PROBLEM` the content of its
refusals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

SPACE = "\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
"""The characters ``str.strip()`` removes (``str.isspace``: what the server calls blank),
as the body of a regex character class that Python ``re``, ECMA 262 (JSON Schema's
``pattern``) and Rust's regex (jsonschema_rs, schemathesis' validator) all read alike.
``\\s`` is not that: ECMA's lacks U+001C-U+001F and U+0085 (whitespace to Python) and has
U+FEFF (not whitespace to Python)."""
NOT_BLANK: dict[str, Any] = {"type": "string", "pattern": f"[^{SPACE}]"}
"""A string that ``str.strip()`` leaves something of (in every regex dialect: :data:`SPACE`)."""

SCHEMAS: dict[str, dict[str, Any]] = {}
"""Registered component schemas by name (the app merges them into the document)."""


def component(model: type[BaseModel], **extra: Any) -> dict[str, str]:
    """Register ``model``'s JSON schema (wire names) as a component; returns a ``$ref`` to it.

    ``extra`` is merged into the model's own schema (for example ``allOf`` rules the
    model cannot express, such as "an IntentRequest carries an intent").
    """
    schema = model.model_json_schema(
        by_alias=True, ref_template="#/components/schemas/{model}", mode="validation"
    )
    for name, definition in schema.pop("$defs", {}).items():
        SCHEMAS.setdefault(name, definition)
    SCHEMAS[model.__name__] = schema | extra
    return {"$ref": f"#/components/schemas/{model.__name__}"}


PROBLEM: dict[str, Any] = {"application/problem+json": {"schema": {"type": "object"}}}
"""The ``content`` of a refusal in a route's ``responses``: an RFC 9457 problem body."""


def has(*path: str, leaf: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema: the object has ``path`` (each step required, an object), ending in ``leaf``."""
    schema = leaf
    for name in reversed(path):
        schema = {"type": "object", "required": [name], "properties": {name: schema}}
    return schema


def json_body(schema: dict[str, Any], description: str, example: Any) -> dict[str, Any]:
    """A route's ``openapi_extra``: a required JSON request body of ``schema`` (given
    ``description``), with ``example``."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {**schema, "description": description},
                    "example": example,
                }
            },
        }
    }


def form_body(
    fields: Mapping[str, str | None],
    required: list[str] | None = None,
    patterns: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A route's ``openapi_extra``: a required ``application/x-www-form-urlencoded`` body of
    the string ``fields`` (name -> meaning; None: no description), the ``required`` ones
    (None: no ``required`` list) and the ``patterns`` of some by name."""
    properties: dict[str, Any] = {}
    for name, text in fields.items():
        properties[name] = {"type": "string"}
        if text is not None:
            properties[name]["description"] = text
        if patterns and name in patterns:
            properties[name]["pattern"] = patterns[name]
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required is not None:
        schema["required"] = required
    form = {"application/x-www-form-urlencoded": {"schema": schema}}
    return {"requestBody": {"required": True, "content": form}}
