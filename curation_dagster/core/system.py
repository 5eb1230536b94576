"""Facts about the machine the code runs on."""
from __future__ import annotations

import os


def available_cpus() -> int:
    """The cores this process may use (containers and taskset restrict them; os.cpu_count() does not know)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's model name (benchmarks print it next to every number: the machines of this project vary)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def load_average() -> str:
    """'load avg 1.23/0.98/0.75': printed with timings taken on a shared machine."""
    return "load avg " + "/".join(f"{v:.2f}" for v in os.getloadavg())
