"""API keys over real HTTP: an app served with two keys answers a missing or wrong key
with OpenAI's 401, serves either key as a Bearer token or an x-api-key header, keeps
/health open for probes and /v1/load closed; the ``openai`` client works with its key. Keys
from an environment variable (``env:NAME``, as a Kubernetes Secret hands them over) resolve
to the same list (``resolve_keys``, which the ingress calls at start)."""

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
                      cluster="keyed", api_keys=(KEY, ENV_KEY))
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
