"""The warehouse process lowers its own I/O priority (best effort)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tagrelay.warehouse import process


@pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine not in ("x86_64", "aarch64"),
    reason="ioprio_set is a Linux system call; only these machines' numbers are known",
)
def test_lower_io_priority_puts_the_process_in_the_idle_class() -> None:
    # In a child of its own: the class cannot be raised again without privileges.
    code = (
        "import ctypes, os, sys\n"
        "from tagrelay.warehouse import process\n"
        "assert process._lower_io_priority()\n"
        "number = {'x86_64': 252, 'aarch64': 31}[os.uname().machine]  # ioprio_get\n"
        "value = ctypes.CDLL(None).syscall(number, 1, 0)\n"
        "print(value >> 13)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert int(out.stdout) == process.IOPRIO_CLASS_IDLE
