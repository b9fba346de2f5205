"""The machine line every benchmark's results carry (``bench/machine.py``)."""

from __future__ import annotations

import os

from dspark.bench.machine import cpu_name, describe, header

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC

processor\t: 1
model name\t: Another CPU
"""


def test_the_cpu_is_the_first_processors_name_family_and_model():
    assert cpu_name(CPUINFO) == "AMD EPYC (family 25, model 17)"
    assert cpu_name("model name\t: Some CPU\n") == "Some CPU"


def test_the_machine_line_names_cpu_cores_torch_and_threads():
    machine = describe()
    assert machine["cpus"] == os.cpu_count() and machine["cpu"]
    text = header("dspark bench engine", dict(machine, cpu="X", cpus=2, torch="2.13.0",
                                                torch_threads=2))
    assert text.startswith("Command: `dspark bench engine`\n\nMachine: X, 2 CPUs; ")
    assert "torch 2.13.0; 2 torch threads" in text
