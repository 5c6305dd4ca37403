"""Decorator presets for every CPU kernel, in one place.

All kernels are compiled once and cached on disk (`cache=True`: the second process start loads machine code
instead of compiling) and release the GIL (`nogil`). Three flavours:

    exact      no fastmath: kernels whose result is promised bit-exact (activation quantizers, KV writes)
    fast       reassociation and contraction allowed: dot products and reductions checked within a tolerance
    parallel   `fast` plus `prange` over disjoint output slices; the thread count is numba's (set_num_threads)
    parallel_exact  `prange` without fastmath: parallel kernels promised bit-exact (integer linears)
    inline     small helpers inlined into their callers at numba-IR level (literal arguments fold there)

Threads: numba's OpenMP layer; whether its workers spin or sleep between parallel regions is decided at
import from how busy the machine is (`_wait_policy`).

Numba keys a cached kernel to its own source file only, but these kernels inline helpers from the other
files of the package: a cache entry is therefore stamped with a hash of every source file here, so editing
any of them recompiles what depends on it instead of loading stale machine code.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
import warnings


def _busy_cores(interval: float = 0.03) -> float:
    """Cores other processes kept busy over `interval` (this one sleeps meanwhile); Linux /proc/stat, else 0."""

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def _wait_policy() -> None:
    """Spin briefly between parallel regions when the cores are free, sleep at once when others use them.

    Decode runs ~100 short parallel regions a token. Waking a sleeping worker costs tens of microseconds on a
    VM, twice a region (start, and the master's wait at the end): on an idle 2-core VM, 2-thread decode went
    35 -> 55 tok/s (qwen) and 64 -> 88 (gemma) spinning. But a spinning worker on a core another process
    wants is descheduled, and then every region waits a scheduler tick (3-15 tok/s measured under load,
    28 sleeping). So: spin for up to 30000 polls (well under a millisecond, then sleep) when other processes
    keep less than half a core busy at start-up, else sleep at once. OMP_WAIT_POLICY in the environment
    wins; PYQUANT_SPIN=0/1 forces either. Set before numba starts its OpenMP pool."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    mode = os.environ.get("PYQUANT_SPIN", "auto")
    if mode == "1" or (mode == "auto" and _busy_cores() < 0.5):
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
        os.environ.setdefault("GOMP_SPINCOUNT", "30000")
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


_wait_policy()

import numba
from numba.core import caching
from numba.core.errors import NumbaIRAssumptionWarning

# numba's own pedantic SSA check misfires on helpers inlined into if/elif branches (linear._matvec_group)
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def package_stamp() -> str:
    """sha256 of the package's kernel sources (backend.py only calls kernels, so it is left out)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(_HERE)):
        if name.endswith(".py") and name not in ("backend.py", "__init__.py"):
            with open(os.path.join(_HERE, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


class _PackageStamped:
    """Cache locator mixin: only for functions of this package, stamped with the whole package's hash."""

    def get_source_stamp(self):
        return package_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != _HERE:
            return None
        return super().from_function(py_func, py_file)


def _numba(name):  # numba < 0.61 spells these with a leading underscore
    return getattr(caching, name, None) or getattr(caching, "_" + name)


class _UserProvidedLocator(_PackageStamped, _numba("UserProvidedCacheLocator")):
    pass


class _InTreeLocator(_PackageStamped, _numba("InTreeCacheLocator")):
    pass


class _UserWideLocator(_PackageStamped, _numba("UserWideCacheLocator")):
    pass


_LOCATORS = _numba("CacheImpl")._locator_classes
if _InTreeLocator not in _LOCATORS:
    _LOCATORS[:0] = [_UserProvidedLocator, _InTreeLocator, _UserWideLocator]

FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}

_KERNELS: list = []  # every dispatcher made here, for compile_counts()


def _registered(**options):
    def decorate(func):
        dispatcher = numba.njit(cache=True, nogil=True, **options)(func)
        _KERNELS.append(dispatcher)
        return dispatcher

    return decorate


exact = _registered()
fast = _registered(fastmath=FASTMATH)
parallel = _registered(fastmath=FASTMATH, parallel=True)
parallel_exact = _registered(parallel=True)
inline = _registered(fastmath=FASTMATH, inline="always")
inline_exact = _registered(inline="always")


def compile_counts() -> tuple[int, int]:
    """(kernel specializations loaded from the disk cache, compiled) so far in this process."""
    hits = sum(sum(k._cache_hits.values()) for k in _KERNELS)
    # a `literally` kernel misses first on plain int arguments, then is retyped with literals: no compile
    misses = sum(n for k in _KERNELS for sig, n in k._cache_misses.items() if sig in k.overloads)
    return hits, misses


def set_threads(n: int | None) -> int:
    """Use n worker threads (None: every core numba sees); returns the count in effect."""
    n = numba.config.NUMBA_NUM_THREADS if n is None else max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n
