"""Human-readable sizes and durations for what the CLI prints (plans, summaries, success lines)."""

from __future__ import annotations

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units with one decimal: ``512 B``, ``1.5 KiB``, ``129.3 MiB``."""
    if abs(n) < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in _BINARY_UNITS[:-1]:
        if abs(value) < 1023.95:  # 1023.96 KiB would print as 1024.0 KiB: move up a unit
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_BINARY_UNITS[-1]}"

def human_seconds(s: float) -> str:
    """A duration as ``850 ms``, ``41.2 s``, ``3m12s`` or ``2h05m`` (rounded, never ``60.0 s``)."""
    s = max(0.0, s)
    if s < 0.1:
        return f"{s * 1000:.0f} ms"
    if round(s, 1) < 60:
        return f"{s:.1f} s"
    total = round(s)
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    minutes = round(s / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"
