"""Settings shared by every test module: a deterministic suite.

Hypothesis draws its examples from a fixed seed (``derandomize``), so that a run's outcome
does not depend on the day; torch tensors come from each test's own generator
(``support.seeded_randn``).
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("gradkit", derandomize=True, database=None)
settings.load_profile("gradkit")
