"""Hypothesis profiles: "ci" (>= 200 examples per property) when the CI environment variable is
set, "dev" (fewer examples, quick local runs) otherwise. HYPOTHESIS_PROFILE overrides both."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
