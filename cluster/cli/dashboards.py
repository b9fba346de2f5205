"""``dspark dashboards``: write the Grafana dashboards (``dspark.cluster.dashboards``)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "dashboards", help="write the Grafana dashboards as JSON",
        description="Write the service, speculation and cluster dashboards (Grafana JSON over "
                    "the Prometheus series of Ray's metrics agents).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="k8s/dashboards", help="directory to write into")


def run(args) -> int:
    from dspark.cluster.dashboards import write

    for path in write(args.out):
        print(path)
    return 0
