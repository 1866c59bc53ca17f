"""Shared pytest/hypothesis configuration for the shadowkv tests (CPU only)."""

import os

from hypothesis import HealthCheck, settings

# No deadline: example run time depends on the (shared, 2-core) machine, not on correctness.
# No example database: runs leave no .hypothesis/ folder behind in the checkout.
settings.register_profile(
    "shadowkv",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Same examples on every run, for CI logs that can be compared run to run.
settings.register_profile("ci", parent=settings.get_profile("shadowkv"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "shadowkv"))
