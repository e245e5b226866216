"""Test-suite settings shared by every test module."""

import os

try:
    from hypothesis import settings
except ImportError:  # the verl environment (.venv-verl) runs only the verl adapter's tests
    settings = None

# CI runs the property tests with a fixed example sequence, so a red build is always reproducible;
# locally they keep exploring new examples on every run.
if settings is not None:
    settings.register_profile("ci", derandomize=True, deadline=None)
    if os.environ.get("CI"):
        settings.load_profile("ci")
