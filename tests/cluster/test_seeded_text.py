"""A seeded request has one text: over HTTP (alone and inside a loaded batch, on the
served DSpark app with its load-dependent budget), from ``dspark generate`` with and
without a drafter, and from plain decoding with that seed."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx

from dspark.models.generation import SamplingParams, generate_tokens

PROMPT = "Write a short poem about the sea."
SEED, MAX_TOKENS = 4242, 24


def chat(served_url, model, text, **params):
    body = {"model": model, "messages": [{"role": "user", "content": text}], **params}
    resp = httpx.post(f"{served_url}/v1/chat/completions", json=body, timeout=180)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def cli_generate(*args):
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-P", "-m", "dspark.cluster.cli", "generate", *args],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.rstrip("\n")


def test_one_text_per_seed_over_http_the_cli_and_plain_decoding(served_url, served_app,
                                                                demo_model):
    target, tok = demo_model
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=SEED)
    want = tok.decode([t for t in generate_tokens(target, tok.chat_prompt(PROMPT), params,
                                                  tok.stop_ids) if t not in tok.stop_ids])
    mine = {"temperature": 1.0, "max_tokens": MAX_TOKENS, "seed": SEED}
    alone = chat(served_url, served_app.model_name, PROMPT, **mine)
    others = [(f"Count from {i} to {i + 20}.", {"temperature": 0.8, "max_tokens": 48})
              for i in range(6)]
    with ThreadPoolExecutor(8) as pool:
        load = [pool.submit(chat, served_url, served_app.model_name, text, **p)
                for text, p in others[:3]]
        loaded = pool.submit(chat, served_url, served_app.model_name, PROMPT, **mine)
        load += [pool.submit(chat, served_url, served_app.model_name, text, **p)
                 for text, p in others[3:]]
        loaded = loaded.result()
        for f in load:
            f.result()
    assert alone == want
    assert loaded == want
    flags = [PROMPT, "--chat", "--temperature", "1.0", "--seed", str(SEED), "--max-tokens",
             str(MAX_TOKENS)]
    assert cli_generate(*flags) == want
    assert cli_generate(*flags, "--drafter", "eagle3") == want
