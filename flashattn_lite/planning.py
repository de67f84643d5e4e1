"""Host-side choices that shape a kernel launch but not its result.

Below the API and beside the backends: the public functions (interface.py, kvcache.py)
and the backends both use these, and this module imports nothing from the package, so
neither floor has to import the other.
"""

MAX_SPLITS = 128  # most split-KV partial results one decoding call merges


def auto_num_splits(programs, max_keys, block_n, num_sms, min_blocks_per_split=4):
    """Split-KV count for ``num_splits=0``: 1 when ``programs`` (independent row blocks:
    batch x kv heads x row blocks) already fill the ``num_sms`` compute units; otherwise
    enough splits to fill them, but each split keeps at least ``min_blocks_per_split``
    key blocks (less work than that is not worth a partial result and a combine)."""
    if programs >= 0.8 * num_sms or max_keys <= 0:
        return 1
    by_units = -(-num_sms // programs)
    by_length = max(1, max_keys // (min_blocks_per_split * block_n))
    return max(1, min(by_units, by_length, MAX_SPLITS))


def unbounded_if_beyond(left, right, seqlen_q, seqlen_k):
    """A window side wider than both sequences is the same as none (-1); normalising it
    keeps kernel index arithmetic (32-bit in Triton) far from overflow."""
    reach = seqlen_q + seqlen_k
    return (-1 if left > reach else left), (-1 if right > reach else right)
