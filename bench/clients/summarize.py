#!/usr/bin/env python3
"""One summary line for one run of run.sh:  summarize.py OUT RUN_NAME

Reads the tool's own report (aiperf profile_export_aiperf.json, guidellm benchmarks.json,
lm-eval results_*.json, schemathesis console log) and, when present, the logging proxy's
out/requests/RUN_NAME.jsonl (every HTTP request and its status).
"""
import collections
import glob
import json
import os
import re
import sys

out, name = sys.argv[1], sys.argv[2]
rc, secs = (open(f"{out}/{name}.rc").read().split() + ["?", "?"])[:2]
parts = []


def http_counts():
    path = f"{out}/requests/{name}.jsonl"
    if not os.path.exists(path):
        return ""
    status = collections.Counter()
    first_bad = None  # the first 5xx, else the first failed POST, else the first 4xx
    rank = lambda r: 0 if r["status"] >= 500 else 1 if r["method"] == "POST" else 2
    for line in open(path):
        r = json.loads(line)
        status[r["status"]] += 1
        if r["status"] >= 400 and (first_bad is None or rank(r) < rank(first_bad)):
            first_bad = r
    if first_bad is not None:
        r = first_bad
        first_bad = f"{r['method']} {r['path']} -> {r['status']} {(r.get('resp') or '')[:160]}"
    total = sum(status.values())
    bad = {s: n for s, n in sorted(status.items()) if not 200 <= s < 300}
    fivexx = sum(n for s, n in status.items() if s >= 500)
    line = (f"http: {total} requests, {total - sum(bad.values())} 2xx, "
            f"non-2xx {bad or 0}, 5xx {fivexx}")
    return line + (f" | first 4xx/5xx: {first_bad}" if first_bad else "")


try:
    if name.startswith("aiperf-"):
        d = json.load(open(f"{out}/{name}/profile_export_aiperf.json"))
        req = int((d.get("request_count") or {}).get("avg", 0))
        errs = int((d.get("error_request_count") or {}).get("avg", 0))
        summ = d.get("error_summary") or []
        errs = max(errs, sum(int(e.get("count", 1)) for e in summ))
        al = (d.get("spec_decode_acceptance_length") or {}).get("avg")
        parts.append(f"requests {req}, errors {errs}")
        parts.append(f"spec-decode acceptance length {al:.2f}" if al else "no spec-decode table")
        for e in summ[:3]:
            parts.append(f"error: {json.dumps(e)[:200]}")
    elif name == "guidellm":
        d = json.load(open(f"{out}/guidellm/benchmarks.json"))
        for b in d["benchmarks"]:
            t = b["metrics"]["request_totals"]
            parts.append(f"requests {t['total']}: {t['successful']} ok, "
                         f"errors {t['errored']}, incomplete {t['incomplete']}")
    elif name.startswith("lm_eval-"):
        files = sorted(glob.glob(f"{out}/{name}/**/results_*.json", recursive=True))
        if not files:
            parts.append("no results (run failed; see log)")
            log = open(f"{out}/{name}.log", errors="replace").read()
            m = (re.findall(r"ClientResponseError: \d{3}, message='[^']*'|HTTPError: \d{3} [^\n]{0,100}", log)
                 or re.findall(r"\w+Error: [^\n]{0,120}", log))
            if m:
                parts.append(f"error: {m[0][:160]}")
        for f in files[-1:]:
            d = json.load(open(f))
            for task, res in d["results"].items():
                ms = ", ".join(f"{k.split(',')[0]}={v:.3f}" for k, v in res.items()
                               if isinstance(v, (int, float)) and "stderr" not in k
                               and k != "sample_len")
                n = d.get("n-samples", {}).get(task, {}).get("effective", "?")
                parts.append(f"{task}: {n} docs, {ms}")
    elif name == "schemathesis":
        log = open(f"{out}/schemathesis.log", errors="replace").read()
        m = re.search(r"Test cases:\s*\n\s*(.+)", log)
        if m:
            parts.append(m.group(1).strip())
        fails = re.findall(r"❌ (ST\d+ [^:\n]+): (\d+)", log)
        if fails:
            parts.append("failures: " + "; ".join(f"{k} x{v}" for k, v in fails))
        last = [line for line in log.splitlines() if line.startswith("=====")]
        if last:
            parts.append(last[-1].strip("= "))
except Exception as e:  # a report missing means the run failed early
    parts.append(f"no report ({type(e).__name__}: {e})")

h = http_counts()
if h:
    parts.append(h)
print(f"{name:16s} rc={rc} {secs}s | " + " | ".join(parts))
