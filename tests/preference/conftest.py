"""Fixtures of the preference-data tests: the post-training tests' one-thread rule (tiny models, see there)."""

from tests.trainers.conftest import one_thread

__all__ = ["one_thread"]
