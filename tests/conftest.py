"""Suite-wide set-up: per-user caches go to a temporary folder, never the user's home."""

import os
import tempfile

os.environ.setdefault("MICROFT_CACHE", tempfile.mkdtemp(prefix="microft-test-cache-"))
