"""The machine line every benchmark prints under its table."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch


def machine_line(device: torch.device) -> str:
    """CPU model, cores, RAM, torch threads, Python/torch/numpy versions and the device name."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"Machine: {cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM ({torch.get_num_threads()} torch threads), "
            f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"device {device} ({dev})")
