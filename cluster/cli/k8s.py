"""``dspark k8s render``: the KubeRay manifests of the serve config (``dspark.cluster.k8s``)."""

from __future__ import annotations

import argparse

from dspark.cluster.cli.common import add_flag


def add_parser(sub) -> None:
    k8s = sub.add_parser("k8s", help="KubeRay manifests")
    which = k8s.add_subparsers(dest="what", required=True)
    render = which.add_parser(
        "render", help="render the RayService, Redis, Prometheus and dashboard objects",
        description="Render the manifests of the serve config (the one `dspark serve` runs) for "
                    "each overlay: demo (CPU) and gpu (H200-class workers).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flag(render, "--config", "none", "serve config YAML (none: the defaults)")
    add_flag(render, "--overlay", "demo,gpu", "overlays to render, comma-separated")
    add_flag(render, "--out", "k8s", "directory to write <overlay>/dspark.yaml into")


def run_render(args) -> int:
    from dspark.cluster.config import ServeConfig
    from dspark.cluster.k8s import write

    cfg = ServeConfig() if args.config in ("", "none") else ServeConfig.from_yaml(args.config)
    overlays = [o.strip() for o in args.overlay.split(",") if o.strip()]
    for path in write(cfg, args.out, overlays):
        print(path)
    return 0
