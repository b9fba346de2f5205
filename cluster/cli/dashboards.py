"""``dspark dashboards``: write the Grafana dashboards (``dspark.cluster.dashboards``)."""

from __future__ import annotations

import argparse

from dspark.cluster.cli.common import add_flag


def add_parser(sub) -> None:
    p = sub.add_parser(
        "dashboards", help="write the Grafana dashboards as JSON",
        description="Write the service, speculation and cluster dashboards (Grafana JSON over "
                    "the Prometheus series of Ray's metrics agents).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flag(p, "--out", "k8s/dashboards", "directory to write into")


def run(args) -> int:
    from dspark.cluster.dashboards import write

    for path in write(args.out):
        print(path)
    return 0
