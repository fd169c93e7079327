"""One line describing the machine a benchmark ran on, for its results file."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    """CPU model, cores, memory, OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        memory = ""
    return f"{cpu}, {os.cpu_count()} CPU cores{memory}, {platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
