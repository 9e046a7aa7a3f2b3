"""The one seeding rule of generation, shared by ``hpc_calo.generate``, ``hpc_calo.sample`` (every backend) and
the benchmarks: the random numbers of output row ``i`` depend on ``(seed, i)`` only.

- Chain noise (the flows' base samples and each generated layer's dequantisation noise) of row ``i`` comes
  from the torch stream of its row block ``i // ROW_BLOCK``, seeded from ``SeedSequence([seed, block])``.
- Log-uniform incident energies of row ``i`` come from the numpy stream of its energy block
  ``i // ENERGY_BLOCK``, seeded from ``SeedSequence([seed, ENERGY_TAG, block])``.

So a 1M-shower ``generate`` and a ``sample`` of the same request cut into shards (any shard size, any worker
count, any backend) give the same showers: bit for bit with the same batch boundaries, device, dtype and CPU
threads, and to rounding otherwise. The device type matters (CUDA and CPU generators draw different streams).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_SEED = 0  # every command and the pipeline launcher
ROW_BLOCK = 64  # rows sharing one chain-noise stream; small enough that a partial block wastes little
ENERGY_BLOCK = 4096  # rows sharing one incident-energy stream
ENERGY_TAG = 0xE1C  # keeps the energy streams apart from the chain-noise streams of the same seed


def row_block_seed(seed: int, block: int) -> int:
    """The 63-bit torch seed of chain-noise row block ``block``."""
    s = np.random.SeedSequence([seed, block]).generate_state(2, dtype=np.uint32)
    return int(s[0]) << 31 | int(s[1]) >> 1


def log_uniform_energies(seed: int, start: int, stop: int, emin: float, emax: float) -> np.ndarray:
    """Incident energies (MeV, float64) of rows [start, stop), log-uniform on [emin, emax]."""
    out = np.empty(max(0, stop - start), dtype=np.float64)
    lo, hi = math.log(emin), math.log(emax)
    for block in range(start // ENERGY_BLOCK, (stop - 1) // ENERGY_BLOCK + 1 if stop > start else 0):
        a = block * ENERGY_BLOCK
        u = np.random.default_rng(np.random.SeedSequence([seed, ENERGY_TAG, block])).random(ENERGY_BLOCK)
        i, j = max(start, a), min(stop, a + ENERGY_BLOCK)
        out[i - start : j - start] = np.exp(lo + (hi - lo) * u[i - a : j - a])
    return out
