"""Cases for tests/test_bench.py's check of the bench's child processes."""

from __future__ import annotations


def multiply(a: int, b: int) -> int:
    return a * b


def allocate(gigabytes: int) -> int:
    return len(bytearray(gigabytes << 30))


def fail(message: str) -> None:
    raise ValueError(message)
