"""posttrain.allocator: the glibc heap settings that keep freed activation memory in the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from posttrain.allocator import retain_freed_memory
first = retain_freed_memory()
print(first, retain_freed_memory())
if first:
    # After the settings, freeing a 64 MiB heap block must not give it back to the kernel:
    # a second allocation of the same size then costs (almost) no new page faults.
    import resource
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    size = 24 << 20  # below the 32 MiB mmap threshold: served from the heap
    def touch():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        return p
    libc.free(ctypes.c_void_p(touch()))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.free(ctypes.c_void_p(touch()))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_freed_heap_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "False":
        pytest.skip("not glibc (no mallopt)")
    assert out[:2] == ["True", "True"]
    assert int(out[2]) < 100  # 24 MiB re-faulted would be about 6,000 page faults


def test_user_malloc_environment_wins():
    env = {"MALLOC_TRIM_THRESHOLD_": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", "from posttrain.allocator import retain_freed_memory as r; print(r())"],
                         capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert out == "False"
