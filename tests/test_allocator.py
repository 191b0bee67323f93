"""Large blocks are reused instead of mapped afresh and faulted in page by page (trainer/allocator.py)."""

import os
import subprocess
import sys

import pytest

# 48 MiB is above the largest block glibc's own adaptive threshold ever moves to the heap
# (32 MiB): untuned, every round maps fresh pages and faults them in (12,288 small pages, fewer
# where the kernel backs them with huge pages); tuned, the heap's freed block is reused.
COUNT_FAULTS = """
import resource, numpy, trainer
numpy.ones(48 << 20, dtype=numpy.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    numpy.ones(48 << 20, dtype=numpy.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", COUNT_FAULTS], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.fixture
def clean_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"}


def test_large_blocks_are_reused_after_importing_trainer(clean_env):
    assert page_faults(clean_env) < 100  # 20 rounds of 48 MiB


def test_a_users_own_malloc_settings_are_kept(clean_env):
    # glibc's default threshold set explicitly: saescope leaves it alone, and every round faults.
    assert page_faults({**clean_env, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}) > 2_000
