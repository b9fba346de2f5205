#!/usr/bin/env python3
"""What each client sends: per request log (out/requests/*.jsonl written by proxy.py), the
routes, the headers, and every JSON body field with the types/values seen.

    python3 shapes.py out/requests/*.jsonl > out/request_shapes.txt
"""
import collections
import json
import sys


def shape(v, depth=0):
    if isinstance(v, dict):
        if depth > 3:
            return "object"
        return "{" + ", ".join(f"{k}: {shape(x, depth + 1)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, list):
        kinds = sorted({shape(x, depth + 1) for x in v[:50]})
        return f"list[{' | '.join(kinds) or 'empty'}]"
    if isinstance(v, str):
        return "str"
    if isinstance(v, bool):
        return "bool"
    return type(v).__name__


for path in sys.argv[1:]:
    recs = [json.loads(line) for line in open(path)]
    print(f"=== {path}: {len(recs)} requests")
    routes = collections.Counter((r["method"], r["path"].split("?")[0], r["status"]) for r in recs)
    for (m, p, s), n in sorted(routes.items()):
        print(f"  {n:4d} x {m} {p} -> {s}")
    heads = collections.Counter((k, v if k != "x-request-id" else "<uuid>")
                                for r in recs for k, v in r.get("headers", {}).items())
    print("  headers: " + "; ".join(f"{k}: {v}" for (k, v), _ in sorted(heads.items())))
    fields = collections.defaultdict(collections.Counter)
    values = collections.defaultdict(set)
    for r in recs:
        b = r.get("body")
        if not isinstance(b, dict):
            if b is not None or "body_raw" in r:
                fields["<non-object body>"][shape(b) if b is not None else "raw"] += 1
            continue
        for k, v in b.items():
            fields[(r["path"].split("?")[0], k)][shape(v)] += 1
            if isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) < 30):
                values[(r["path"].split("?")[0], k)].add(json.dumps(v))
            elif isinstance(v, dict) and len(json.dumps(v)) < 80:
                values[(r["path"].split("?")[0], k)].add(json.dumps(v, sort_keys=True))
    for key, kinds in sorted(fields.items(), key=str):
        vals = sorted(values.get(key, ()))
        vs = f"  values: {', '.join(vals[:8])}{' ...' if len(vals) > 8 else ''}" if vals else ""
        ks = ", ".join(f"{t} x{n}" for t, n in kinds.most_common(6))
        print(f"  {key[0] if isinstance(key, tuple) else ''} {key[1] if isinstance(key, tuple) else key}: {ks}{vs}")
    print()
