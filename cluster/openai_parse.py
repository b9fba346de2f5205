"""Request parsing of the OpenAI-compatible API, the one validation: the body's JSON
(UTF-8, depth, lone surrogates), unsupported fields, the schema, the model's name and the
served model's limits, each a 400 (404 for the model) naming the field."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from dspark.cluster.openai_errors import APIError
from dspark.cluster.openai_schema import MAX_PROMPTS, MAX_STOPS, ServedModel

FORMS = {
    "prompt": (f"a non-empty string, a list of 1-{MAX_PROMPTS} non-empty strings, a non-empty "
               f"list of token ids (>= 0) or a list of 1-{MAX_PROMPTS} such lists"),
    "stop": f"a non-empty string or a list of at most {MAX_STOPS} non-empty strings",
    "content": "a string or a list of text parts ({'type': 'text', 'text': ...})",
    "tool_choice": "not supported",
}
_TYPE_NAMES = ("str", "int", "float", "bool", "dict", "list", "none")

# Fields of OpenAI's API this server does not implement: a 400 naming the field, unless the
# value asks for nothing (what some clients send by default).
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
               "response_format", "audio", "modalities", "prediction", "web_search_options",
               "reasoning_effort", "suffix", "best_of", "service_tier")
_NOTHING = (None, [], "", "none", "auto", {"type": "text"}, "default")


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic (or FastAPI) validation error as a 400 naming the field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # NOTE: union members appear in the location ("prompt.list[int].0"): name the field and
    # the forms it takes instead
    union = [i for i, p in enumerate(loc) if "[" in p or "-" in p or p in _TYPE_NAMES
             or p == "TextPart"]
    field = loc[: union[0]] if union else loc
    param = ".".join(field) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    named = re.match(r"^(\w+): ", message)
    if param is None and named:  # a check across fields names the field it is about
        param, message = named.group(1), message[named.end():]
    if first.get("type") == "extra_forbidden":
        message = "this field is not supported by this server"
    elif union and field and field[-1] in FORMS and first.get("type") != "value_error":
        message = f"must be {FORMS[field[-1]]}"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def parse_json(body: bytes, max_depth: int) -> Any:
    """Decode a request body: valid UTF-8, valid JSON, nested at most ``max_depth`` deep,
    no lone surrogates (``"\\ud800"``) in any string, integral numbers as ints (``3.0`` is
    the JSON Schema integer 3). Raises a 400 ``APIError``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8: {exc}") from exc
    try:
        data = json.loads(text)
    except RecursionError as exc:  # NOTE: the C parser stops at Python's recursion limit
        raise APIError(400, f"request body nests JSON too deep; at most {max_depth}") from exc
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from exc
    return _checked(data, "", 1, max_depth)


def _checked(value: Any, path: str, depth: int, max_depth: int) -> Any:
    """``value`` with integral floats as ints, walked once: a lone surrogate in a key or
    string, or nesting beyond ``max_depth``, is a 400 (naming the field for a surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{path or 'body'}: invalid Unicode (a lone surrogate)",
                           param=path or None) from None
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**63 else value
    if isinstance(value, dict | list) and depth > max_depth:
        raise APIError(400, f"request body nests JSON too deep; at most {max_depth}")
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            _checked(key, sub, depth, max_depth)
            out[key] = _checked(item, sub, depth + 1, max_depth)
        return out
    if isinstance(value, list):
        return [_checked(item, f"{path}[{i}]", depth + 1, max_depth)
                for i, item in enumerate(value)]
    return value


def _text_only(messages: Any) -> None:
    """A content part that is not text (an image, audio, a file) is a 400 that says so."""
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise APIError(400, f"messages.{i}.content: content parts of type {kind!r} are "
                               "not supported: this model takes text only (type 'text')",
                               param=f"messages.{i}.content")


def parse(model: type[BaseModel], data: Any, served: ServedModel) -> Any:
    """``data`` (a decoded body) as a ``model`` request to ``served``: unsupported fields,
    then the schema (400), then the model's name (404), then the served model's limits
    (400)."""
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    data = _without_unsupported(data)
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    check_model(body.model, served)
    try:
        body.check_limits(served)
    except ValueError as exc:
        field, message = str(exc).split(": ", 1)
        raise APIError(400, f"{field}: {message}", param=field) from None
    return body


def _without_unsupported(data: dict) -> dict:
    """``data`` without the unsupported fields that ask for nothing; any other is a 400."""
    data = dict(data)
    _text_only(data.get("messages"))
    for name in UNSUPPORTED:
        if name not in data:
            continue
        value = data.pop(name)
        if value in _NOTHING or (name == "best_of" and value == data.get("n", 1)) or (
                name == "parallel_tool_calls" and isinstance(value, bool)):
            continue
        raise APIError(400, f"{name}: not supported by this server", param=name,
                       code="unsupported_parameter")
    return data


def check_model(name: str, served: ServedModel, param: str = "model") -> None:
    """404 unless ``name`` is the served model's."""
    if name != served.name:
        raise APIError(404, f"model {name!r} does not exist; this server serves "
                       f"{served.name!r}", param=param, code="model_not_found")
