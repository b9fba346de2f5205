"""The machine a benchmark ran on, recorded beside its results (``Machine:`` under the
command in each ``.md``, ``machine`` in each ``.json``). Ratios are measured side by side
in one run, but tokens/s and milliseconds belong to the machine: two 2-core guests of the
same kind differed two- to threefold in step time (docs/engine.md, "Session 20")."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name(cpuinfo: str | None = None) -> str:
    """The first processor's model name with its family and model numbers (from
    ``/proc/cpuinfo`` where there is one; else what ``platform`` says)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # NOTE: the first processor's block only
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def describe() -> dict:
    """CPU, logical CPUs, torch's version and threads, and the first CUDA device if any."""
    import torch

    info = {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def header(command: str, machine: dict) -> str:
    """A result file's first lines: the command, then the machine."""
    parts = [f"{machine['cpu']}, {machine['cpus']} CPUs", f"torch {machine['torch']}",
             f"{machine['torch_threads']} torch threads"]
    if "gpu" in machine:
        parts.append(machine["gpu"])
    return f"Command: `{command}`\n\nMachine: {'; '.join(parts)}.\n\n"
