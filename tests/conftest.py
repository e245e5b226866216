"""Test-suite settings shared by every test module."""

import os

from hypothesis import settings

# CI runs the property tests with a fixed example sequence, so a red build is always reproducible;
# locally they keep exploring new examples on every run.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
