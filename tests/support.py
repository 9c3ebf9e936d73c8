"""Test support: the service as a real subprocess on a free loopback port.

The benchmarks' helper serves the tests too (bench/ may not import tests/;
tests may import bench/), so there is one way to run the service as a process.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "ServiceProcess", "free_port"]
