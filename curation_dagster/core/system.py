"""Facts about the machine the code runs on."""
from __future__ import annotations

import os


def available_cpus() -> int:
    """The cores this process may use (containers and taskset restrict them; os.cpu_count() does not know)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
