"""Large CPU tensors reuse freed memory once `keep_freed_memory` is set (the trainer sets it in every process)."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from eellm_hf.host_memory import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_large_tensors_stop_page_faulting_after_the_first():
    """A 100 MB tensor allocated, written and freed ten times faults its pages in once, not ten times: without
    the setting glibc maps each such block afresh and the kernel zeroes its ~25,000 pages again every time."""
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # once per process; a second call changes nothing

    def faults_of_ten_allocations() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.empty(25 * 2**20, dtype=torch.float32).fill_(1.0)  # 100 MB, every page touched
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_ten_allocations()  # the heap grows once
    pages_of_one = 100 * 2**20 // resource.getpagesize()
    assert faults_of_ten_allocations() < pages_of_one // 10
