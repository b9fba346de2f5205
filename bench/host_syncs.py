"""`python -m dspark.bench.host_syncs`: where an engine step makes the host wait for the GPU.

A host sync drains the GPU's queue: the host stops until every kernel launched so far has
run, and the GPU then idles while the host prepares the next ones. Each engine system of
``--systems`` (``bench/engine_bench.py``'s) serves a closed loop of ``--concurrency``
requests on the demo checkpoints, and every sync its steps make is counted and placed:

- on CUDA, by torch's sync debug mode (``torch.cuda.set_sync_debug_mode``): every
  synchronizing call (a read of a device tensor's values, a blocking copy from pageable host
  memory, ``nonzero``, ``repeat_interleave`` without ``output_size``...) warns, and the
  warning is attributed to the innermost frame of the project's code;
- on the CPU (nothing there synchronizes) two things are counted instead: the reads of a
  tensor's values on the host (``item``, ``tolist``, ``nonzero``, ``bool``, ``int``...),
  which on a GPU are syncs where the tensor lives on the device, and the calls of
  ``torch.tensor`` and ``torch.as_tensor`` given a device (``copies`` below), each a
  blocking copy, so a sync, when that device is a GPU (``kernels/transfer.py``). The CPU's
  own paths differ from the GPU's in places (verification and the budget read on the host
  there), so these are the CPU run's counts, not the GPU's.

Per system, temperature and concurrency: steps, syncs per step (drafted and plain steps
apart), and the places of the syncs with their count per step. JSON to ``--out``, a
table printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

HOST_READS = ("item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__",
              "__index__")
"""What reads a tensor's values back on the host (counted on the CPU)."""

OWN = ("/workers/", "/kernels/", "/models/")
"""The project's code that a sync is attributed to (its innermost frame there)."""


def site(stack: traceback.StackSummary) -> str:
    """``folder/file.py:line function`` of the innermost frame of the project's code."""
    for frame in reversed(stack):
        path = frame.filename.replace("\\", "/")
        if any(part in path for part in OWN) and not path.endswith("bench/host_syncs.py"):
            tail = "/".join(path.split("/")[-2:])
            return f"{tail}:{frame.lineno} {frame.name}"
    return "elsewhere"


class SyncCounter:
    """Counts syncs (CUDA), or host reads and device-given tensor builds (CPU), while
    ``active``, by site."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.sites: collections.Counter[str] = collections.Counter()
        self.copies = 0
        self.active = False

    def note(self) -> None:
        if self.active:
            self.sites[site(traceback.extract_stack()[:-2])] += 1

    @contextmanager
    def installed(self):
        if self.device == "cuda":
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                shown = warnings.showwarning

                def show(message, category, *args, **kwargs):
                    if "synchronizing" in str(message):
                        self.note()
                    else:
                        shown(message, category, *args, **kwargs)

                warnings.showwarning = show
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield self
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    warnings.showwarning = shown
            return
        originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

        def counted(original):
            def read(*args, **kwargs):
                self.note()
                return original(*args, **kwargs)
            return read

        builders = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

        def copying(original):
            def build(*args, **kwargs):
                if self.active and kwargs.get("device") is not None:
                    self.copies += 1
                return original(*args, **kwargs)
            return build

        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        for name, original in builders.items():
            setattr(torch, name, copying(original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
            for name, original in builders.items():
                setattr(torch, name, original)


def measure(engine, prompts, stop_ids, concurrency: int, num_requests: int,
            temperature: float, max_tokens: int, counter: SyncCounter) -> dict:
    """One closed loop on ``engine``; the syncs of each of its steps."""
    from dspark.bench.closed_loop import ClosedLoop
    from dspark.models.generation import SamplingParams

    loop = ClosedLoop(engine, prompts, stop_ids, concurrency, num_requests,
                      lambda i: SamplingParams(temperature=temperature, max_tokens=max_tokens))
    per_step = {"drafted": [], "plain": []}
    sites: collections.Counter[str] = collections.Counter()
    steps, copies = 0, {"drafted": [], "plain": []}
    while not loop.done:
        counter.sites.clear()
        counter.copies = 0
        counter.active = True
        stats = loop.tick()
        counter.active = False
        if stats is None:
            continue
        steps += 1
        kind = "drafted" if stats.num_draft_tokens else "plain"
        per_step[kind].append(sum(counter.sites.values()))
        copies[kind].append(counter.copies)
        sites.update(counter.sites)
    every = per_step["drafted"] + per_step["plain"]
    return {
        "steps": steps,
        "syncs_per_step": sum(every) / max(len(every), 1),
        "drafted_steps": len(per_step["drafted"]),
        "syncs_per_drafted_step": mean(per_step["drafted"]),
        "syncs_per_plain_step": mean(per_step["plain"]),
        "sites_per_step": {k: v / max(steps, 1) for k, v in sites.most_common()},
        "copies_per_drafted_step": mean(copies["drafted"]),
        "copies_per_plain_step": mean(copies["plain"]),
    }


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target", default="checkpoints/target")
    parser.add_argument("--drafters", default="checkpoints/drafters")
    parser.add_argument("--systems", default="no-spec,dspark-d2-alg1")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from dspark.bench.engine_bench import SYSTEMS, domain_prompts
    from dspark.models.generation import load_for_generation
    from dspark.workers.engine import EngineConfig

    known = {s.label: s for s in SYSTEMS}
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not wanted or any(s not in known for s in wanted):
        raise SystemExit(f"--systems: choose from {list(known)}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    target, tokenizer = load_for_generation(args.target)
    target = target.to(args.device).eval()
    prompts = domain_prompts(tokenizer, target.config.max_position_embeddings,
                             args.max_tokens, 8, 0)
    base = EngineConfig(max_num_seqs=max(32, *concurrencies))
    counter = SyncCounter(args.device)
    rows = []
    for label in wanted:
        engine = known[label].build(target, args.drafters, base, 0)
        measure(engine, prompts, tokenizer.stop_ids, 2, 2, 0.0, 8, counter)  # NOTE: warm-up
        with counter.installed():
            for temp in temps:
                for conc in concurrencies:
                    row = measure(engine, prompts, tokenizer.stop_ids, conc, 2 * conc, temp,
                                  args.max_tokens, counter)
                    rows.append({"system": label, "temperature": temp, "concurrency": conc,
                                 **row})
                    print(line(rows[-1]), flush=True)
    what = "syncs" if args.device == "cuda" else "host reads (a CPU run: not syncs)"
    print(f"\n{what} per step, by place (mean over the loop's steps):")
    for row in rows:
        print(f"- {row['system']} T={row['temperature']:g} C={row['concurrency']}:")
        for where, count in list(row["sites_per_step"].items())[:12]:
            print(f"    {count:6.2f}  {where}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": args.device, "counted": what,
                                              "rows": rows}, indent=1))
    return 0


def line(row: dict) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.2f}"
    return (f"{row['system']:<24} T={row['temperature']:g} C={row['concurrency']:<3} "
            f"steps {row['steps']:4d} (drafted {row['drafted_steps']:4d})  per step "
            f"{fmt(row['syncs_per_step'])}  drafted {fmt(row['syncs_per_drafted_step'])}  "
            f"plain {fmt(row['syncs_per_plain_step'])}; copies drafted "
            f"{fmt(row['copies_per_drafted_step'])} plain {fmt(row['copies_per_plain_step'])}")


if __name__ == "__main__":
    raise SystemExit(main())
