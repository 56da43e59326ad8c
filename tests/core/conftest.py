"""Hypothesis profiles for the core tests.

- ``ci`` (the default): modest example counts, no deadline (shared CI machines are noisy), so the
  whole ``tests/core`` run stays well under three minutes on two cores.
- ``dev``: several times more examples, for a longer local run.
- ``thorough``: many more, for an occasional soak (minutes to tens of minutes).

Choose one with ``HYPOTHESIS_PROFILE=dev pytest tests/core`` (or hypothesis's own
``--hypothesis-profile`` option). Individual tests scale their example counts from the profile's
``max_examples`` with ``strategies.examples``, so the profiles stay the single knob.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# The helper modules (reference.py, strategies.py) sit next to the tests; make them importable in
# every pytest import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}

settings.register_profile("ci", max_examples=100, stateful_step_count=40, **_COMMON)
settings.register_profile("dev", max_examples=400, stateful_step_count=60, **_COMMON)
settings.register_profile("thorough", max_examples=3000, stateful_step_count=100, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
