"""Human units for sizes and durations (plan, inspect and the CLI's success line)."""

from __future__ import annotations

import pytest

from compress.units import human_bytes, human_seconds


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (1024**2 - 1, "1.0 MiB"), (123_456_789, "117.7 MiB"), (538 * 1024**2, "538.0 MiB"),
    (5 * 1024**3, "5.0 GiB"), (3 * 1024**4, "3.0 TiB"),
])
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize("s,text", [
    (0.004, "4 ms"), (0.1, "0.1 s"), (41.23, "41.2 s"), (59.96, "1m00s"), (192.4, "3m12s"),
    (3599.6, "1h00m"), (7500, "2h05m"), (-1.0, "0 ms"),
])
def test_human_seconds(s: float, text: str) -> None:
    assert human_seconds(s) == text
