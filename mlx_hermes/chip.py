"""Which machine is this, and how fast can its memory stream?

Decode speed of a mixture of experts is bounded by memory bandwidth, so the
profiler compares what it reaches with what the chip can do. On a Mac the
chip is read from `sysctl` and `system_profiler` and its rated bandwidth
looked up; elsewhere (CPU, CUDA) a streaming pass through MLX measures a
practical ceiling, and a rated figure is shown too where one is known.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx


def on_cuda(device: Optional[mx.Device] = None) -> bool:
    """Whether `device` (default: MLX's default device) is the GPU of MLX's
    CUDA build: where the CUDA-only paths and workarounds apply."""
    device = mx.default_device() if device is None else device
    return device == mx.gpu and mx.cuda.is_available()


# Apple's rated unified-memory bandwidth, GB/s. Where Apple sells one chip
# with two GPU sizes at different bandwidths, keyed by GPU core count.
MAC_BANDWIDTH_GBS: dict[str, float | dict[int, float]] = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": {30: 300, 40: 400}, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": {32: 410, 40: 546},
}

# Rated memory bandwidth of data-centre GPUs MLX's CUDA build runs on, GB/s.
GPU_BANDWIDTH_GBS = {"H100": 3350, "H200": 4800, "A100": 2039}


@dataclass
class Chip:
    name: str
    memory_bytes: int
    gpu_cores: Optional[int] = None
    rated_gbs: Optional[float] = None  # from a table
    measured_gbs: Optional[float] = None  # streaming pass through MLX

    @property
    def peak_gbs(self) -> Optional[float]:
        """The ceiling decode is held against: rated on a Mac, measured elsewhere."""
        if self.name.startswith("Apple") and self.rated_gbs:
            return self.rated_gbs
        return self.measured_gbs or self.rated_gbs


def mac_bandwidth(name: str, gpu_cores: Optional[int]) -> Optional[float]:
    """Rated GB/s for e.g. "Apple M3 Max" with 30 GPU cores."""
    key = name.removeprefix("Apple ").strip()
    rated = MAC_BANDWIDTH_GBS.get(key)
    if isinstance(rated, dict):
        if gpu_cores in rated:
            return rated[gpu_cores]
        return min(rated.values())  # unknown variant: the lower figure, not a guess up
    return rated


def parse_mac(brand: str, memsize: str, displays: str) -> Chip:
    """From `sysctl -n machdep.cpu.brand_string`, `sysctl -n hw.memsize` and
    `system_profiler SPDisplaysDataType`."""
    name = brand.strip()
    cores = re.search(r"Total Number of Cores:\s*(\d+)", displays)
    gpu_cores = int(cores.group(1)) if cores else None
    return Chip(name, int(memsize.strip()), gpu_cores, mac_bandwidth(name, gpu_cores))


def detect(run: Callable[[list[str]], str] = None) -> Chip:
    """This machine. On macOS from sysctl; elsewhere from MLX's device info."""
    run = run or _run
    if platform.system() == "Darwin":
        try:
            return parse_mac(run(["sysctl", "-n", "machdep.cpu.brand_string"]),
                             run(["sysctl", "-n", "hw.memsize"]),
                             run(["system_profiler", "SPDisplaysDataType"]))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass  # fall through to what MLX knows
    info = mx.device_info()
    if mx.default_device() == mx.cpu:
        name = f"CPU ({platform.machine()}, {_cpu_count()} cores)"
    else:
        name = str(info.get("device_name", "GPU"))
    rated = next((v for k, v in GPU_BANDWIDTH_GBS.items() if k in name), None)
    memory = info.get("memory_size") or _physical_memory()
    return Chip(name, int(memory), rated_gbs=rated)


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s of a streaming read+write pass (y = x + 1) through MLX: the best a
    memory-bound kernel can do on this device, in practice."""
    x = mx.zeros((megabytes * 2**20 // 4,), mx.float32)
    mx.eval(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(x + 1)
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best / 1e9


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout


def _cpu_count() -> int:
    return os.cpu_count() or 1


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
