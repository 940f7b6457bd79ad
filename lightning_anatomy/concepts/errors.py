"""The concept layer's error type, apart so that `concept_set` and `directions` share it
without importing each other."""

from __future__ import annotations


class ConceptSetError(ValueError):
    """A malformed concept set: names the concept and field, and how to fix it."""
