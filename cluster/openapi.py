"""The ``/openapi.json`` document: FastAPI's schema of the ingress's routes, plus the
request bodies the completion routes parse themselves (so that size limits and errors come
first) and the served model's limits (token counts below the context, token ids below the
vocabulary)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from dspark.cluster.openai_schema import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    CompletionResponse,
    ServedModel,
)


def openapi_document(api: FastAPI, served: ServedModel | None = None) -> dict:
    """The document of ``api``'s routes; with ``served``, its name and limits."""
    schema = get_openapi(title=api.title, version=api.version, description=api.description,
                         routes=api.routes)
    _, defs = models_json_schema(
        [(CompletionRequest, "validation"), (ChatCompletionRequest, "validation"),
         (ChatCompletionChunk, "serialization"), (CompletionResponse, "serialization")],
        ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))
    for path, model in (("/v1/completions", CompletionRequest),
                        ("/v1/chat/completions", ChatCompletionRequest)):
        schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    if served is not None:
        _document_limits(components, served.context, served.vocab)
        for name in ("CompletionRequest", "ChatCompletionRequest"):  # the one model served
            components[name]["properties"]["model"]["enum"] = [served.name]
    return schema


def _document_limits(components: dict, context: int, vocab: int) -> None:
    """Put the served model's limits into the request schemas: token counts below the
    context, token ids below the vocabulary (``logit_bias`` keys included)."""

    def walk(node, visit):
        if isinstance(node, dict):
            visit(node)
            for value in node.values():
                walk(value, visit)
        elif isinstance(node, list):
            for value in node:
                walk(value, visit)

    def counts(node):
        if node.get("type") == "integer":
            node["maximum"] = context - 1

    def token_ids(node):
        if node.get("type") == "integer":
            node["maximum"] = vocab - 1
        if node.get("type") == "array" and node.get("items", {}).get("type") == "integer":
            node["maxItems"] = context - 1

    def bias_keys(node):
        if node.get("type") == "object":
            node["propertyNames"] = {"pattern": below_regex(vocab)}

    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = components[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            walk(props[field], counts)
        walk(props["logit_bias"], bias_keys)
        if "prompt" in props:
            walk(props["prompt"], token_ids)


def below_regex(n: int) -> str:
    """A regex of the decimal integers in [0, n) without leading zeros."""
    top = str(n - 1)
    if len(top) == 1:
        return f"^[0-{top}]$"
    parts = ["0", f"[1-9][0-9]{{0,{len(top) - 2}}}"]
    for i, digit in enumerate(top):
        low = 1 if i == 0 else 0
        if int(digit) > low:
            parts.append(f"{top[:i]}[{low}-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}")
    parts.append(top)
    return "^(?:" + "|".join(parts) + ")$"
