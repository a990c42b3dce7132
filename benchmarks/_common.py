"""Shared helpers for the benchmark scripts: machine description, result files (timing: allocation.timing)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

LOAD_CAVEAT = (
    "CPU timings come from a 2-core machine shared with other jobs: absolute times vary run to run "
    "(see load_average); ratios are measured in one process with the methods interleaved."
)


def device_label(device: torch.device) -> str:
    """'cpu' or 'cuda': the suffix of the result file names."""
    return device.type


def machine(device: torch.device) -> dict:
    """What ran the benchmark: device name, torch version, threads, load average."""
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "small_parallel_op_ms": small_parallel_op_ms() if device.type == "cpu" else None,
        "platform": platform.platform(),
    }


def small_parallel_op_ms(repeats: int = 20) -> float:
    """Median ms of one small parallel CPU op (x + 1 on 2^20 floats) started after a 1 ms pause.

    With several threads this includes waking the idle worker threads; on the shared VM used here
    that wake-up, not the arithmetic, dominates, and every op of a multi-op kernel pays it.
    """
    x = torch.ones(1 << 20)
    times = []
    for _ in range(repeats):
        time.sleep(0.001)
        start = time.perf_counter()
        torch.add(x, 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def write_result(name: str, device: torch.device, payload: dict) -> Path:
    """Write ``payload`` to benchmarks/results/<name>_<device>.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{device_label(device)}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


README = Path(__file__).resolve().parent.parent / "README.md"


def write_marked_section(text: str, start: str, end: str, readme: Path = README) -> bool:
    """Replace what lies between the ``start`` and ``end`` markers of ``readme`` by ``text``.

    Written to a temporary file and renamed over the README; returns False (README unchanged) when
    the markers are missing or out of order.
    """
    if not readme.exists():
        return False
    content = readme.read_text()
    if start not in content or end not in content or content.index(start) > content.index(end):
        return False
    before, rest = content.split(start, 1)
    after = rest.split(end, 1)[1]
    temporary = readme.with_name(readme.name + ".tmp")
    temporary.write_text(f"{before}{start}\n{text.rstrip()}\n{end}{after}")
    temporary.replace(readme)
    return True
