"""Choosing the compute device: ``--device auto`` means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from .errors import InputError
from .writer import parse_size


def resolve_device(name: str | None = "auto") -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name!r} is not a torch device (use auto, cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} asked for CUDA but torch sees no CUDA device; use --device cpu")
    return dev


# ----------------------------------------------------------------------------------------------------------------
# how much memory is free (defaults of the search cache's budgets)

HOST_RESERVE_MIN = 2 << 30  # host bytes left to everything else: at least 2 GiB ...
HOST_RESERVE_FRACTION = 0.10  # ... or 10 % of the machine's memory


def _meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes ({} where there is none)."""
    out = {}
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except (OSError, ValueError):
        return {}
    return out


def host_memory() -> tuple[int, int]:
    """(available, total) host bytes: the kernel's MemAvailable (what can be allocated without swapping)."""
    info = _meminfo()
    if "MemAvailable" in info and "MemTotal" in info:
        return info["MemAvailable"], info["MemTotal"]
    import psutil  # not Linux: accelerate brings psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def host_reserve(total: int) -> int:
    return max(HOST_RESERVE_MIN, int(HOST_RESERVE_FRACTION * total))


def gpu_memory(dev: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device as the driver reports them."""
    free, total = torch.cuda.mem_get_info(dev)
    return int(free), int(total)


def parse_budget(value: int | str | None, option: str) -> int | None:
    """A memory budget: None (use what is free), bytes, or a size as for --max-shard-size ('500MB', '8GB');
    0 is allowed (nothing resident)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"{option} {value!r}: expected a size like 8GB, 500MB or 0")
    if isinstance(value, (int, float)):
        if value < 0:
            raise InputError(f"{option} {value}: must be >= 0")
        return int(value)
    text = str(value).strip()
    if text.rstrip("BKMGTIbkmgti ") in ("0", "0.0"):
        return 0
    try:
        return parse_size(text)
    except InputError:
        raise InputError(f"{option} {value!r}: expected a size like 8GB, 500MB, 2GiB or 0") from None
