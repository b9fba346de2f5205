"""Grafana dashboards as code: every panel's PromQL over the series of
``dspark.cluster.metrics`` (as Ray exports them: ``ray_`` prefix, ``_total`` on counters).

``dspark dashboards --out k8s/dashboards`` writes them as Grafana JSON (one file per
dashboard, a ``datasource`` variable for the Prometheus that scrapes Ray's metrics agents).
The committed files are this module's output (a test regenerates and compares them), and a
test runs every query against a real Prometheus scraping a served app under load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RATE = "1m"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]
    """(legend, PromQL) per series."""
    unit: str = "short"
    description: str = ""


def m(name: str) -> str:
    """A metric's name as Prometheus sees it."""
    return f"ray_dspark_{name}"


def rate(counter: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({m(counter)}_total[{RATE}]))"


def quantile(q: float, histogram: str) -> str:
    return (f"histogram_quantile({q}, sum by (le) "
            f"(rate({m(histogram)}_bucket[{RATE}])))")


def quantiles(histogram: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"p{round(q * 100)}", quantile(q, histogram)) for q in (0.5, 0.9, 0.99))


SERVICE = (
    Panel("Requests by status", (("{{status}}", rate("http_requests", "status")),), "reqps",
          "HTTP completion requests answered per second, by status code (499: the client "
          "went away)."),
    Panel("Errors", (("4xx and 5xx",
                      f'sum (rate({m("http_requests")}_total{{status=~"4..|5.."}}[{RATE}]))'),),
          "reqps"),
    Panel("Time to first token", quantiles("time_to_first_token_seconds"), "s"),
    Panel("Inter-token latency", quantiles("inter_token_latency_seconds"), "s"),
    Panel("End-to-end latency", quantiles("request_duration_seconds"), "s"),
    Panel("Tokens per second", (("completion", rate("completion_tokens")),
                                ("prompt", rate("prompt_tokens"))), "short"),
    Panel("Running and waiting requests",
          (("running", f'sum ({m("num_requests_running")})'),
           ("waiting", f'sum ({m("num_requests_waiting")})')), "short"),
    Panel("KV cache used", (("used", f'sum ({m("kv_blocks_used")}) / (sum '
                                     f'({m("kv_blocks_used")}) + sum ({m("kv_blocks_free")}))'),),
          "percentunit"),
    Panel("Prefix-cache hit rate", (("hits / lookups", f'{rate("prefix_cache_hits")} / '
                                                        f'{rate("prefix_cache_queries")}'),),
          "percentunit", "Share of admitted requests' known tokens found in the prefix cache."),
)

SPECULATION = (
    Panel("Mean acceptance length",
          (("tokens per drafting round",
            f'1 + {rate("spec_decode_num_accepted_tokens")} / '
            f'{rate("spec_decode_num_drafts")}'),), "short",
          "vLLM's definition: 1 + accepted drafts per drafting round."),
    Panel("Draft acceptance rate",
          (("accepted / verified", f'{rate("spec_decode_num_accepted_tokens")} / '
                                   f'{rate("spec_decode_num_draft_tokens")}'),), "percentunit"),
    Panel("Acceptance per position",
          (("position {{position}}",
            f'{rate("spec_decode_num_accepted_tokens_per_pos", "position")} / ignoring '
            f'(position) group_left {rate("spec_decode_num_drafts")}'),), "percentunit",
          "Share of drafting rounds whose draft at this position was accepted."),
    Panel("Verified length distribution",
          (("l_r = {{length}}", rate("spec_decode_verified_length", "length")),), "short",
          "Drafting rounds per second by the number of drafts the budget verified."),
    Panel("Gated-off share",
          (("not drafted / decoding", f'{rate("spec_decode_num_gated_off")} / '
                                      f'({rate("spec_decode_num_gated_off")} + '
                                      f'{rate("spec_decode_num_drafts")})'),), "percentunit",
          "Decoding request-steps the cost gate did not draft for."),
    Panel("Calibration drift (online ECE)",
          (("{{replica}}", f'max by (replica) ({m("calibration_ece")})'),
           ("drifted", f'max by (replica) ({m("calibration_drifted")})')), "short",
          "The confidence head's online ECE over the sliding window, and 1 while it exceeds "
          "the drift threshold. Losslessness never depends on it; throughput does."),
    Panel("Predicted vs observed survival",
          (("predicted {{position}}",
            f'avg by (position) ({m("calibration_predicted_survival")})'),
           ("observed {{position}}",
            f'avg by (position) ({m("calibration_observed_survival")})')), "percentunit"),
    Panel("Step time by phase",
          (("{{phase}}", f'{rate("step_phase_seconds", "phase")} / ignoring (phase) '
                         f'group_left {rate("engine_steps")}'),), "s"),
    Panel("Step duration", quantiles("step_duration_seconds"), "s"),
)

CLUSTER = (
    Panel("Running requests per replica",
          (("{{replica}}", f'sum by (replica) ({m("num_requests_running")})'),), "short"),
    Panel("Generated tokens per replica",
          (("{{replica}}", rate("generation_tokens", "replica")),), "short"),
    Panel("Verified tokens per step, by expert-parallel group",
          (("{{ep_group}} / {{replica}}",
            f'max by (ep_group, replica) ({m("step_verify_tokens")})'),), "short",
          "Rows of each rank's last target forward: an unbalanced group waits for its "
          "heaviest rank."),
    Panel("Router decisions", (("{{outcome}}", rate("router_decisions", "outcome")),),
          "reqps", "Decisions of the load-board router: ranked from the board, or fallbacks "
          "to queue length when the board is stale or ranking failed."),
    Panel("Load-board age seen by replicas",
          (("{{replica}}", f'max by (replica) ({m("board_age_seconds")})'),), "s",
          "Seconds since each replica last read the board (-1: it does not read it)."),
    Panel("Budget mode", (("{{replica}}: {{mode}}",
                           f'max by (replica, mode) ({m("budget_mode")})'),), "short"),
)

DASHBOARDS = {
    "dspark-service": ("dspark: service overview", SERVICE),
    "dspark-speculation": ("dspark: speculation", SPECULATION),
    "dspark-cluster": ("dspark: cluster", CLUSTER),
}


def queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, PromQL) of every series of every panel."""
    return [(uid, p.title, q) for uid, (_, panels) in DASHBOARDS.items() for p in panels
            for _, q in p.queries]


def dashboard(uid: str) -> dict:
    """One dashboard as Grafana JSON."""
    title, panels = DASHBOARDS[uid]
    source = {"type": "prometheus", "uid": "${datasource}"}
    return {
        "uid": uid, "title": title, "tags": ["dspark"], "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"}, "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "panels": [{
            "id": i + 1, "type": "timeseries", "title": p.title, "description": p.description,
            "datasource": source,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), "expr": q, "legendFormat": legend,
                         "datasource": source} for j, (legend, q) in enumerate(p.queries)],
        } for i, p in enumerate(panels)],
    }


def write(out: str | Path) -> list[Path]:
    """Write every dashboard as ``<uid>.json`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid in DASHBOARDS:
        path = out / f"{uid}.json"
        path.write_text(json.dumps(dashboard(uid), indent=2) + "\n")
        paths.append(path)
    return paths
