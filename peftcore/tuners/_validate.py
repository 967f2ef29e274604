"""Field checks shared by every config's ``__post_init__`` (and so by every load), and the memory
check the injections make before they allocate.

A config comes from user code or from a file somebody else wrote, so each field is type-checked
(``bool`` is not an int here, ``4.9`` is not a rank), every number must be finite and within a
bound that a real adapter can have, and every regex must compile.  Errors are ``TypeError`` (wrong
type) or ``ValueError`` (wrong value) naming ``<Config>.<field>``; loading prefixes the file.
"""

from __future__ import annotations

import math
import os
import re

INT_MAX = 2**31 - 1  # the largest int any size field may take: every torch extent fits, no overflow
FLOAT_MAX = 1e6  # |scale factors| (alpha, scaling, init stds) above this are no adapter anyone trains
PATTERN_MAX = 1000  # characters of one user regex (a module-name pattern)


def _name(cls, field: str) -> str:
    return f"{cls if isinstance(cls, str) else type(cls).__name__}.{field}"


def integer(cls, field: str, value, lo: int = 1, hi: int = INT_MAX) -> int:
    """An int (not a bool, not a float: ``4.9`` is no rank) in ``[lo, hi]``."""
    expect = f"an int >= {lo} and <= {hi}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_name(cls, field)} must be {expect}, got {_short(value)}")
    if not lo <= value <= hi:
        why = f" (a size above {INT_MAX} cannot be allocated)" if value > hi == INT_MAX else ""
        raise ValueError(f"{_name(cls, field)} must be {expect}, got {value!r}{why}")
    return value


def number(cls, field: str, value, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, expect: str | None = None) -> float | int:
    """A finite int or float (not a bool) in the interval given (open ends where asked);
    ``expect`` words the interval for the message (default: the interval itself)."""
    if expect is None:
        left = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        expect = f"in {left}, {right} (finite)"
    else:
        expect = f"{expect} (finite" + (f", at most {hi:g})" if hi is not None else ")")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_name(cls, field)} must be {expect}, got {_short(value)}")
    finite = abs(value) <= 2**63 if isinstance(value, int) else math.isfinite(value)
    low_ok = lo is None or (value > lo if lo_open else value >= lo)
    high_ok = hi is None or (value < hi if hi_open else value <= hi)
    if not (finite and low_ok and high_ok):
        raise ValueError(f"{_name(cls, field)} must be {expect}, got {value!r}")
    return value


def boolean(cls, field: str, value, optional: bool = False):
    if value is None and optional:
        return value
    if not isinstance(value, bool):
        extra = " or null" if optional else ""
        raise TypeError(f"{_name(cls, field)} must be a bool (true or false{extra}), got {value!r} ({type(value).__name__})")
    return value


def choice(cls, field: str, value, options, optional: bool = False):
    if value is None and optional:
        return value
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{_name(cls, field)} must be one of {tuple(options)}" + (" or None" if optional else "")
                         + f", got {value!r}")
    return value


def string(cls, field: str, value, optional: bool = True, max_len: int = 4096):
    if value is None and optional:
        return value
    if not isinstance(value, str) or len(value) > max_len:
        raise TypeError(f"{_name(cls, field)} must be a string (at most {max_len} characters)"
                        + (" or None" if optional else "") + f", got {_short(value)}")
    return value


def regex(cls, field: str, pattern) -> str:
    """A regex string that compiles with Python's ``re`` (PEFT's semantics) and is not oversized."""
    if not isinstance(pattern, str):
        raise TypeError(f"{_name(cls, field)} must be a regex string, got {_short(pattern)}")
    if len(pattern) > PATTERN_MAX:
        raise ValueError(f"{_name(cls, field)}: the regex is {len(pattern)} characters, at most {PATTERN_MAX} are accepted")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{_name(cls, field)}: {pattern!r} is not a valid regular expression: {e}") from None
    return pattern


def names_or_regex(cls, field: str, value, optional: bool = True, allow_empty: bool = True):
    """None, a regex string (full-matched), or a list of module names / dotted suffixes."""
    if value is None and optional:
        return value
    if isinstance(value, str):
        return regex(cls, field, value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) and all(isinstance(v, str) for v in value) \
            else list(value)
        bad = [v for v in items if not isinstance(v, str) or not v or len(v) > PATTERN_MAX]
        if bad or (not items and not allow_empty):
            raise TypeError(f"{_name(cls, field)} must be None, a regex string or a {'non-empty ' if not allow_empty else ''}"
                            f"list of module names/suffixes, got {_short(value)}")
        return items
    raise TypeError(f"{_name(cls, field)} must be None, a regex string or a list of module names/suffixes, "
                    f"got {_short(value)}")


def int_list(cls, field: str, value, lo: int = 0, allow_int: bool = False, optional: bool = False):
    if value is None and optional:
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return integer(cls, field, value, lo=lo)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{_name(cls, field)} must be a list of ints" + (" or an int" if allow_int else "")
                        + f", got {_short(value)}")
    for i, v in enumerate(value):
        integer(cls, f"{field}[{i}]", v, lo=lo)
    return list(value)


def _short(value) -> str:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({type(value).__name__})"


# --- memory --------------------------------------------------------------------------------------
def memory_limit(device) -> int | None:
    """Bytes of memory ``device`` has in all (physical RAM for the CPU); None where nothing is allocated
    (meta) or it cannot be told."""
    import torch

    device = torch.device("cpu" if device is None else device)
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, RuntimeError, AssertionError):
        return None
    return None


def check_fits(what: str, numel: int, element_size: int = 4, device=None) -> None:
    """Raise before allocating when ``numel`` elements of ``element_size`` bytes cannot fit in the
    memory of ``device`` at all; ``what`` names the config field(s) the size comes from."""
    limit = memory_limit(device)
    need = int(numel) * int(element_size)
    if limit is not None and need > limit:
        raise ValueError(
            f"{what}: the adapter would need {int(numel):,} parameters ({need / 2**30:,.1f} GiB), more than "
            f"the {limit / 2**30:,.1f} GiB of memory of {device or 'cpu'}: it cannot be allocated"
        )
