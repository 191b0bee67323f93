"""Tensors' memory is reused instead of mapped afresh and faulted in page by page (trainer/allocator.py)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess  # each test counts page faults in a fresh interpreter

# Each round holds blocks of 4, 8 and 12 MiB at once, then frees them, as a forward pass does
# with its temporaries. glibc's defaults adapt: the blocks move to the heap after the first round,
# but freeing 24 MiB at its top crosses the trim threshold (twice the largest block), so the heap
# is shrunk and the next round faults its pages in again. Tuned, the heap keeps them.
COUNT_FAULTS = """
import resource, numpy, trainer
def one_round():
    blocks = [numpy.ones(mib << 20, dtype=numpy.uint8) for mib in (4, 8, 12)]
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", COUNT_FAULTS], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.fixture
def clean_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"}


def test_freed_memory_is_reused_after_importing_trainer(clean_env):
    assert page_faults(clean_env) < 100  # 20 rounds of 24 MiB (6,144 pages)


@pytest.mark.parametrize("setting", [
    {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)},  # glibc's starting threshold, fixed
    {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"},  # a no-op tunable: glibc's adaptive defaults
])
def test_a_users_own_malloc_settings_are_kept(clean_env, setting):
    assert page_faults({**clean_env, **setting}) > 2_000  # saescope left malloc alone: rounds fault again
