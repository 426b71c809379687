"""The machine a timing was taken on: benchmarks and the test suite print it beside every time."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_model() -> str:
    """The CPU model as ``lscpu`` reports it, with its family and model numbers: a virtual machine may name it
    only "AMD EPYC", and machines of one name differ 3x in speed (family 23 against 25)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    fields = {
        key.strip(): value.strip() for key, _, value in (line.partition(":") for line in out.splitlines())
    }
    name = fields.get("Model name") or platform.processor() or platform.machine()
    numbers = [
        f"{label} {fields[key]}"
        for key, label in (("CPU family", "family"), ("Model", "model"))
        if fields.get(key)
    ]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"
