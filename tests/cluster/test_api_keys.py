"""API keys over real HTTP: an app served with two keys answers a missing or wrong key
with OpenAI's 401, serves either key as a Bearer token or an x-api-key header, keeps
/health open for probes and /v1/load closed; the ``openai`` client works with its key. Keys
from an environment variable (``env:NAME``, as a Kubernetes Secret hands them over) resolve
to the same list (``resolve_keys``, which the ingress calls at start). Per-key limits: a key
with a request in flight at its limit gets OpenAI's 429 with Retry-After while another key
is served, and its allowance comes back when the stream ends; a key past its requests per
minute is refused until the window frees a slot. The same app streams 3 tokens per event
(``stream_interval``): its events carry the tokens of a response that is not streamed,
one at first, then 3 per event, the rest last."""

from __future__ import annotations

import httpx
import pytest

KEY, ENV_KEY = "sk-dspark-test-1", "sk-dspark-test-2"
CHAT = {"model": "keyed", "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def keyed(ray_cluster, served_app):
    from ray import serve

    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import start

    cfg = ServeConfig(model_name="keyed", drafter="none", max_num_seqs=2, num_blocks=64,
                      threads=1, replica_cpus=0.25, redis_url=served_app.redis_url,
                      cluster="keyed", api_keys=(KEY, ENV_KEY), api_key_max_streams=1,
                      api_key_rate_limit=1000, stream_interval=3)
    start(cfg, app_name="keyed", route_prefix="/keyed")
    yield f"http://{served_app.host}:{served_app.port}/keyed"
    serve.delete("keyed")


@pytest.mark.parametrize("headers, message", [
    ({}, "didn't provide an API key"),
    ({"Authorization": "Bearer sk-wrong"}, "Incorrect API key"),
    ({"x-api-key": KEY[:-1]}, "Incorrect API key"),
    ({"Authorization": f"Basic {KEY}"}, "didn't provide an API key"),
])
def test_a_missing_or_wrong_key_gets_openais_401(keyed, headers, message):
    for method, path, body in (("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None),
                               ("GET", "/v1/load", None)):
        resp = httpx.request(method, keyed + path, json=body, headers=headers, timeout=60)
        assert resp.status_code == 401, (path, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "invalid_api_key" and message in error["message"]
        assert error["type"] == "invalid_request_error"
        assert resp.headers["www-authenticate"] == "Bearer"
        assert KEY not in resp.text and ENV_KEY not in resp.text


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"},
                                     {"authorization": f"bearer {ENV_KEY}"},
                                     {"x-api-key": ENV_KEY}])
def test_either_key_is_served_either_way(keyed, headers):
    resp = httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text
    assert httpx.get(f"{keyed}/v1/load", headers=headers, timeout=60).status_code == 200


def test_probes_and_the_schema_need_no_key(keyed):
    assert httpx.get(f"{keyed}/health", timeout=60).status_code == 200
    assert httpx.get(f"{keyed}/openapi.json", timeout=60).status_code == 200


def test_the_openai_client_sends_its_key(keyed):
    import openai

    good = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0)
    reply = good.chat.completions.create(**CHAT)
    assert reply.choices[0].finish_reason in ("stop", "length")
    bad = openai.OpenAI(base_url=f"{keyed}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**CHAT)


def test_env_entries_name_comma_separated_keys(monkeypatch):
    from dspark.cluster.access import resolve_keys

    monkeypatch.setenv("DSPARK_TEST_API_KEYS", f"other, {ENV_KEY}")
    assert resolve_keys([KEY, "env:DSPARK_TEST_API_KEYS"]) == (
        KEY.encode(), b"other", ENV_KEY.encode())
    monkeypatch.delenv("DSPARK_TEST_API_KEYS")
    with pytest.raises(ValueError, match="DSPARK_TEST_API_KEYS, which is not set"):
        resolve_keys(["env:DSPARK_TEST_API_KEYS"])


def test_a_bad_key_entry_is_refused_by_name():
    from dspark.cluster.config import ServeConfig

    with pytest.raises(ValueError, match="api_keys must be non-empty strings"):
        ServeConfig(api_keys=("has space",))
    with pytest.raises(ValueError, match="api_keys must be non-empty strings"):
        ServeConfig(api_keys=("",))


def test_a_key_at_its_stream_limit_gets_429_and_its_allowance_back(keyed):
    """``api_key_max_streams=1``: while one of KEY's streams runs, KEY's next request is
    refused (429, Retry-After) and ENV_KEY's is served; after the stream ends KEY's is."""
    long = {**CHAT, "max_tokens": 256, "min_tokens": 256, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{keyed}/v1/chat/completions", json=long, headers=headers,
                      timeout=120) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it runs
        refused = httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, headers=headers,
                             timeout=60)
        other = httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, timeout=120,
                           headers={"x-api-key": ENV_KEY})
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "at most 1 at once" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert other.status_code == 200, other.text
    again = httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, headers=headers, timeout=120)
    assert again.status_code == 200, again.text


def test_a_key_past_its_requests_per_minute_waits_for_the_window():
    from dspark.cluster.access import WINDOW_S, ApiKeys
    from dspark.cluster.openai_errors import APIError

    keys = ApiKeys([KEY, ENV_KEY], rate=3)
    mine, other = {"x-api-key": KEY}, {"x-api-key": ENV_KEY}
    for _ in range(3):
        keys.admit(mine).release()
    for _ in range(2):  # NOTE: a refused request takes nothing of the allowance
        with pytest.raises(APIError) as refused:
            keys.admit(mine)
        assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
        assert 1 <= int(refused.value.headers["Retry-After"]) <= WINDOW_S
    keys.admit(other).release()  # the limit is per key
    keys._started[0][0] -= WINDOW_S  # the oldest request leaves the window
    keys.admit(mine).release()
    with pytest.raises(APIError):
        keys.admit(mine)


def test_limits_without_keys_are_refused_by_name():
    from dspark.cluster.config import ServeConfig

    with pytest.raises(ValueError, match="need api_keys"):
        ServeConfig(api_key_max_streams=2)
    with pytest.raises(ValueError, match=r"api_key_rate_limit must be an integer in \[0, "):
        ServeConfig(api_keys=(KEY,), api_key_rate_limit=-1)


def test_a_streamed_response_sends_stream_interval_tokens_per_event(keyed):
    import json

    body = {**CHAT, "max_tokens": 11, "ignore_eos": True, "logprobs": True}
    headers = {"x-api-key": KEY}
    whole = httpx.post(f"{keyed}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert whole.status_code == 200, whole.text
    tokens = [e["token"] for e in whole.json()["choices"][0]["logprobs"]["content"]]
    events = []
    with httpx.stream("POST", f"{keyed}/v1/chat/completions", json={**body, "stream": True},
                      headers=headers, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["logprobs"]:
                    events.append([e["token"] for e in choice["logprobs"]["content"]])
    assert [len(e) for e in events] == [1, 3, 3, 3, 1]
    assert [t for e in events for t in e] == tokens
