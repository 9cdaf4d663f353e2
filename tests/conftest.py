"""Suite-wide set-up: per-user caches go to a temporary folder, never the user's home.

The MFU peak each run's summary divides by is pre-seeded there for the CPU (a stand-in figure), so
the suite never spends seconds per process probing matmuls, minutes where bf16 is emulated; a
subprocess started by a test inherits MICROFT_CACHE and so the same figures. tests/test_perf.py
checks the probe itself.
"""

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("MICROFT_CACHE", tempfile.mkdtemp(prefix="microft-test-cache-"))


def _seed_peak_cache() -> None:
    from microft import perf

    path = Path(os.environ["MICROFT_CACHE"]) / "peak-flops.json"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    threads = range(1, max(os.cpu_count() or 1, 8) + 1)
    path.write_text(json.dumps({perf._probe_key("cpu", d, n): 1e11 for d in ("float32", "bfloat16", "float16")
                                for n in threads}))


_seed_peak_cache()
