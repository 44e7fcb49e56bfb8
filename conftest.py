"""Root conftest: session fixtures and hypothesis profiles. Hooks and options live in harness/plugin.py."""

import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["fixtures.sweep", "fixtures.user_runs", "pytester"]

# fast: CI and the default run. thorough: HYPOTHESIS_PROFILE=thorough pytest -m invariants
settings.register_profile("fast", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
