"""The OpenAI API as real clients use it, over real HTTP on the served demo_model app: content
parts, prompt lists and token ids, ``n``, logprobs (the target's) with ``echo``, penalties,
logit bias and ``min_tokens`` (lossless against plain decoding with the same modifiers),
continuous usage, ``/v1/models/{id}``, every error in the OpenAI shape, body limits,
invalid Unicode, strict types, and an OpenAPI document that describes every body."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

PROMPT = "What is 7 * 8?"


@pytest.fixture(scope="module")
def client(served_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{served_url}/v1", api_key="unused", max_retries=0)


def plain_ids(demo_model, prompt_ids, **params):
    from dspark.models.generation import SamplingParams, generate_tokens

    model, tok = demo_model
    out = list(generate_tokens(model, prompt_ids, SamplingParams(**params), tok.stop_ids))
    return [t for t in out if t not in tok.stop_ids]


def plain_chat(demo_model, text, **params):
    model, tok = demo_model
    return tok.decode(plain_ids(demo_model, tok.chat_prompt(text), **params))


def target_logprobs(demo_model, ids):
    """log_softmax of the demo_model target's logits at every position: [len(ids), V]."""
    model, _ = demo_model
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def post(served_url, path, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{served_url}{path}", content=data, timeout=120,
                      headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                      **kw)


def assert_error(resp, status, param=None, *words):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err


# ---------------------------------------------------------------------------- requests
def test_chat_content_as_text_parts_equals_plain_string_content(client, served_app, demo_model):
    parts = [{"type": "text", "text": "What is 7 "}, {"type": "text", "text": "* 8?"}]
    reply = client.chat.completions.create(
        model=served_app.model_name, messages=[{"role": "user", "content": parts}],
        max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == plain_chat(demo_model, PROMPT, max_tokens=24)


def test_image_parts_are_a_clear_400(served_url, served_app):
    body = {"model": served_app.model_name, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"served_url": "data:image/png;base64,AAAA"}}]}]}
    assert_error(post(served_url, "/v1/chat/completions", body), 400, "messages.0.content",
                 "image_url", "text only")


def test_prompt_lists_strings_and_token_ids_give_one_choice_per_prompt(served_url, served_app, demo_model):
    _, tok = demo_model
    texts = ["def add(a, b):", "The capital of"]
    ids = [tok.encode(t) for t in texts]
    want = [tok.decode(plain_ids(demo_model, i, max_tokens=8, ignore_eos=True)) for i in ids]
    for prompt in (texts, ids):
        resp = post(served_url, "/v1/completions", {"model": served_app.model_name, "prompt": prompt,
                                             "max_tokens": 8, "temperature": 0,
                                             "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert [c["index"] for c in out["choices"]] == [0, 1]
        assert [c["text"] for c in out["choices"]] == want
        assert out["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
        assert out["usage"]["completion_tokens"] == 16
    single = post(served_url, "/v1/completions", {"model": served_app.model_name, "prompt": ids[0],
                                           "max_tokens": 8, "temperature": 0,
                                           "ignore_eos": True}).json()
    assert single["choices"][0]["text"] == want[0]


def test_n_samples_are_independent_choices(served_url, served_app, demo_model):
    body = {"model": served_app.model_name, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 16, "n": 3, "temperature": 1.0, "seed": 7}
    out = post(served_url, "/v1/chat/completions", body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in out["choices"]]
    assert len(set(texts)) > 1  # three draws, not one draw copied
    _, tok = demo_model
    assert out["usage"]["prompt_tokens"] == len(tok.chat_prompt(PROMPT))  # once, not 3x
    spec = out["metrics"]["speculative_decoding"]
    # NOTE: the cost gate may draft none of 48 sampled tokens (it prices drafting from this
    # replica's measured step costs): the three choices' metrics add up either way
    assert spec["num_spec_steps"] == sum(spec["acceptance_histogram"])
    assert spec["num_accepted_draft_tokens"] <= spec["num_draft_tokens"]
    greedy = post(served_url, "/v1/chat/completions", {**body, "temperature": 0}).json()
    want = plain_chat(demo_model, PROMPT, max_tokens=16)
    assert [c["message"]["content"] for c in greedy["choices"]] == [want] * 3


def test_streamed_n_and_continuous_usage(client, served_app):
    chunks = list(client.chat.completions.create(
        model=served_app.model_name, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12, n=2, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    texts = {0: "", 1: ""}
    seen = []
    for c in chunks[:-1]:
        assert c.usage is not None  # usage so far on every chunk
        seen.append(c.usage.completion_tokens)
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert seen == sorted(seen) and seen[-1] > 0
    assert texts[0] == texts[1] != ""
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == seen[-1]


def test_chat_logprobs_are_the_targets(client, served_app, demo_model):
    _, tok = demo_model
    reply = client.chat.completions.create(
        model=served_app.model_name, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=10, temperature=0, logprobs=True, top_logprobs=3, extra_body={
            "ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 10
    ids = tok.chat_prompt(PROMPT)
    generated = plain_ids(demo_model, ids, max_tokens=10, ignore_eos=True)
    full = target_logprobs(demo_model, ids + generated)
    for k, entry in enumerate(content):
        row = full[len(ids) - 1 + k]
        assert entry.logprob == pytest.approx(float(row[generated[k]]), abs=2e-2)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy


def test_completion_echo_logprobs_score_the_prompt_like_lm_eval(served_url, served_app, demo_model):
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1."""
    _, tok = demo_model
    ids = tok.encode("The answer is 56 because 7 times 8 is 56.")
    body = {"model": served_app.model_name, "prompt": [ids], "echo": True, "logprobs": 1,
            "max_tokens": 1, "temperature": 0}
    out = post(served_url, "/v1/completions", body).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    full = target_logprobs(demo_model, ids)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(full[i - 1, ids[i]]), abs=2e-2)
        assert len(lp["top_logprobs"][i]) >= 1
    assert out["choices"][0]["text"].startswith(tok.decode(ids))
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    score_only = post(served_url, "/v1/completions", {**body, "max_tokens": 0}).json()
    assert score_only["choices"][0]["text"] == tok.decode(ids)
    scores = score_only["choices"][0]["logprobs"]["token_logprobs"]
    assert scores[0] is None and scores[1:] == pytest.approx(lp["token_logprobs"][1:-1],
                                                             abs=1e-3)
    assert len(score_only["choices"][0]["logprobs"]["tokens"]) == len(ids)
    assert score_only["usage"]["completion_tokens"] == 0
    nothing = post(served_url, "/v1/completions", {**body, "max_tokens": 0, "echo": False}).json()
    assert nothing["choices"][0]["text"] == "" and nothing["usage"]["completion_tokens"] == 0


def test_integral_json_numbers_are_integers(served_url, served_app):
    body = {"model": served_app.model_name, "prompt": "hi", "max_tokens": 3.0, "n": 2.0,
            "ignore_eos": True}
    out = post(served_url, "/v1/completions", body).json()
    assert len(out["choices"]) == 2 and out["usage"]["completion_tokens"] == 6
    assert_error(post(served_url, "/v1/completions", {**body, "max_tokens": 3.5}), 400, "max_tokens")


@pytest.mark.parametrize("modifiers", [
    {"presence_penalty": 2.0, "frequency_penalty": 2.0},
    {"presence_penalty": 1.0, "frequency_penalty": 2.0},
    {"logit_bias": {"455": -100.0, "56": 2.0}},
])
def test_penalties_and_logit_bias_equal_plain_decoding_with_them(served_url, served_app, demo_model,
                                                                modifiers):
    _, tok = demo_model
    body = {"model": served_app.model_name, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 40, "temperature": 0, **modifiers}
    text = post(served_url, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    params = {k: v for k, v in modifiers.items() if k != "logit_bias"}
    if "logit_bias" in modifiers:
        params["logit_bias"] = {int(k): v for k, v in modifiers["logit_bias"].items()}
    want = plain_chat(demo_model, PROMPT, max_tokens=40, **params)
    assert text == want
    assert want != plain_chat(demo_model, PROMPT, max_tokens=40)  # the modifiers did something


def test_min_tokens_holds_off_the_end_of_turn(served_url, served_app, demo_model):
    natural = plain_ids(demo_model, demo_model[1].chat_prompt(PROMPT), max_tokens=200)
    body = {"model": served_app.model_name, "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0, "min_tokens": len(natural) + 5, "max_tokens": len(natural) + 5}
    out = post(served_url, "/v1/chat/completions", body).json()
    assert out["usage"]["completion_tokens"] == len(natural) + 5
    assert out["choices"][0]["finish_reason"] == "length"
    capped = post(served_url, "/v1/chat/completions", {**body, "min_tokens": 9, "max_tokens": 4})
    assert capped.json()["usage"]["completion_tokens"] == 4  # max_tokens ends it first
    assert_error(post(served_url, "/v1/chat/completions", {**body, "min_tokens": 512}), 400,
                 "min_tokens", "[0, 511]")


def test_max_tokens_is_bounded_by_what_the_context_leaves(served_url, served_app, demo_model):
    _, tok = demo_model
    ids = tok.encode("def add(a, b):")
    body = {"model": served_app.model_name, "prompt": ids, "max_tokens": 511,
            "temperature": 0, "ignore_eos": True}
    out = post(served_url, "/v1/completions", body).json()
    assert out["usage"]["completion_tokens"] == 512 - len(ids)
    assert out["choices"][0]["finish_reason"] == "length"
    assert_error(post(served_url, "/v1/completions", {**body, "max_tokens": 512}), 400,
                 "max_tokens", "[1, 511]")


def test_acceptance_length_is_at_least_one_without_speculative_steps(served_url, served_app):
    body = {"model": served_app.model_name, "prompt": "hi", "max_tokens": 1}
    spec = post(served_url, "/v1/completions", body).json()["metrics"]["speculative_decoding"]
    assert spec["num_spec_steps"] == 0 and spec["mean_acceptance_length"] == 1.0


def test_the_openai_client_takes_every_supported_field(client, served_app):
    chat = client.chat.completions.create(
        model=served_app.model_name,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        max_completion_tokens=16, temperature=0.7, top_p=0.9, n=2, seed=3, stop=["\n\n"],
        presence_penalty=0.2, frequency_penalty=0.1, logit_bias={"5": 1.0}, logprobs=True,
        top_logprobs=2, user="tester", extra_body={"min_tokens": 1, "ignore_eos": False})
    assert len(chat.choices) == 2 and all(c.logprobs.content for c in chat.choices)
    comp = client.completions.create(
        model=served_app.model_name, prompt=["def f(x):", "import os"], max_tokens=8, n=2,
        echo=True, logprobs=2, temperature=0, seed=1, stop="\n\n", presence_penalty=0.1,
        frequency_penalty=0.1, logit_bias={"7": -1.0}, stream=True,
        stream_options={"include_usage": True})
    chunks = list(comp)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2, 3}
    assert chunks[-1].usage.prompt_tokens > 0
    model = client.models.retrieve(served_app.model_name)
    assert model.id == served_app.model_name


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
    ("frobnicate", 1),
])
def test_unimplemented_fields_are_a_400_naming_them(served_url, served_app, field, value):
    body = {"model": served_app.model_name, "messages": [{"role": "user", "content": "hi"}],
            field: value}
    assert_error(post(served_url, "/v1/chat/completions", body), 400, field, field)


@pytest.mark.parametrize("extra,param", [
    ({"stop": ""}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"stream": 1}, "stream"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logit_bias": {"999999": 1.0}}, "logit_bias"),
    ({"n": 0}, "n"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
])
def test_strict_fields_and_ranges(served_url, served_app, extra, param):
    body = {"model": served_app.model_name, "prompt": "hi", "max_tokens": 4, **extra}
    assert_error(post(served_url, "/v1/completions", body), 400, param)


def test_routes_and_methods_errors_are_openai_shaped(served_url, served_app):
    assert_error(httpx.get(f"{served_url}/v1/nope"), 404, None, "/v1/nope")
    assert_error(httpx.get(f"{served_url}/v1/completions"), 405, None, "GET")
    assert_error(httpx.get(f"{served_url}/v1/models/gpt-4"), 404, "model_id", "gpt-4")
    card = httpx.get(f"{served_url}/v1/models/{served_app.model_name}").json()
    assert card["id"] == served_app.model_name and card["object"] == "model"


def test_invalid_unicode_depth_and_size_are_rejected_quickly(served_url, served_app):
    name = served_app.model_name
    lone = json.dumps({"model": name, "messages": [{"role": "user", "content": "LONE hi"}]})
    lone = lone.replace("LONE", "\\ud800").encode()
    assert_error(post(served_url, "/v1/chat/completions", lone), 400, "messages[0].content",
                 "Unicode")
    assert_error(post(served_url, "/v1/chat/completions", b'{"model": "\xff"}'), 400, None, "UTF-8")
    deep = b'{"model": "x", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_error(post(served_url, "/v1/completions", deep), 400, None, "deep")
    huge = json.dumps({"model": name, "prompt": "a" * (2 * 1024 * 1024)}).encode()
    assert_error(post(served_url, "/v1/completions", huge), 413, None, "larger than")


def test_openapi_documents_every_body(served_url, served_app):
    doc = httpx.get(f"{served_url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, req, resp in [("/v1/completions", "CompletionRequest", "CompletionResponse"),
                            ("/v1/chat/completions", "ChatCompletionRequest",
                             "ChatCompletionResponse")]:
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{req}"
        assert {"model", "max_tokens", "logprobs", "n", "stream_options"} <= set(
            schemas[req]["properties"])
        ok = op["responses"]["200"]["content"]
        assert ok["application/json"]["schema"]["$ref"].endswith(resp)
        assert "text/event-stream" in ok
        for status in ("400", "404", "413", "429", "500", "503"):
            assert op["responses"][status]["content"]["application/json"]["schema"][
                "$ref"].endswith("ErrorResponse")
    assert "ChatCompletionChunk" in schemas and "TextPart" in schemas
    # the served model's limits: token counts below the context, ids below the vocabulary
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 511} in chat["max_tokens"]["anyOf"]
    bias = next(s for s in chat["logit_bias"]["anyOf"] if s.get("type") == "object")
    assert bias["propertyNames"]["pattern"].endswith("|4095)$")
    prompt = json.dumps(schemas["CompletionRequest"]["properties"]["prompt"])
    assert '"maximum": 4095' in prompt and '"maxItems": 511' in prompt
    assert doc["paths"]["/v1/models/{model_id}"]["get"]["responses"]["200"]
