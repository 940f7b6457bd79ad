"""Checks of the plain options the concept callbacks share: schedules, sizes, renamed options."""

from __future__ import annotations

import warnings


def check_every(value: object, option: str) -> int:
    """`value` if it is an integer >= 1 (a schedule or a size), else one error naming `option`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
    return value


def renamed_option(owner: str, new: str, value: object, old: str, old_value: object,
                   default: object = None) -> object:
    """The value of option `new`, also accepted under its deprecated name `old` for one release.

    `old_value` (None when not passed) wins with a DeprecationWarning naming `new`; passing both
    (`value` other than its `default`) is refused, since one of them would be silently ignored.
    """
    if old_value is None:
        return value
    warnings.warn(
        f"{owner}: {old}= is deprecated and will be removed in the next release; use {new}= (same meaning)",
        DeprecationWarning,
        stacklevel=3,
    )
    if value is not None and value != default:
        raise ValueError(f"{owner}: got both {new}={value!r} and its deprecated name {old}={old_value!r}; pass {new} only")
    return old_value


__all__ = ["check_every", "renamed_option"]
