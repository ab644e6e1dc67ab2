"""What a timing was measured on: CPU model, cores, RAM, threads, versions, and the CPU's matmul speed.

Timings of the same job differ by 2x or more between 2-core machines (vector width, clock); the
float32 matmul rate printed beside them lets a reader scale them to their own machine.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device) -> str:
    """CPU model, cores, RAM, torch threads, Python/torch/numpy versions and the device name."""
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores, {ram:.1f} GiB RAM ({torch.get_num_threads()} torch "
            f"threads), Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"device {device} ({dev})")


def matmul_gflops(n: int = 1024, repeats: int = 7) -> float:
    """Median float32 rate of an n x n by n x n matmul on the CPU with torch's threads, in GFLOP/s
    (2 n^3 operations per product; about 0.1 s at n = 1024 on 2 cores)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up (thread pool, kernel choice)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / max(time.perf_counter() - t0, 1e-9) / 1e9)
    return statistics.median(rates)
