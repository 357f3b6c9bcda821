"""The test session's seed: GSS_TEST_SEED (default 0).

Every random draw of the tests (weights at init, training rows, made-up inputs) derives from it, so that
`GSS_TEST_SEED=3 make test-cpu` runs the whole suite under another draw: a test that trains toward a threshold
must pass for any seed, not only for the one it was written with.
"""

import os

try:
    TEST_SEED = int(os.environ.get("GSS_TEST_SEED", "0"))
except ValueError:
    raise SystemExit(f"GSS_TEST_SEED={os.environ['GSS_TEST_SEED']!r}: must be a whole number, e.g. GSS_TEST_SEED=3")
