"""The one rounding rule for prices and quantities on an instrument grid (tick size, qty step).

Rule: a value within GRID_EPS of a step from a grid point IS that grid point (float noise such as
100.57000000000001 for 100.57 never moves an order a whole tick); any other value is rounded in the
stated direction: -1 down (floor), +1 up (ceil), 0 to the nearest grid point, ties up.

Two implementations of the same rule, kept equal by a brute-force test (tests/test_grid.py):
`snap_round` (numba) for the compiled backtest, strategy and labels, and `snap_round_dec` (Decimal)
for the exchange boundary (exchange_client.InstrumentRules, which must send exact strings). The
float result is the double nearest to the exact grid value (integer grid index times the step's
integer mantissa, divided by a power of ten), so float(snap_round_dec(...)) == snap_round(...).
Directions follow the exchange's rules: a PostOnly buy rounds down and a sell up (a maker never
crosses by rounding); quantities round down (rounding adds no risk beyond a millionth of a step).
"""
from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

import numpy as np
from numba import njit

GRID_EPS = 1e-6          # fraction of a step within which a value counts as on the grid
_MAX_DECIMALS = 15       # steps are decimal numbers with at most this many decimals
DOWN, NEAREST, UP = -1, 0, 1

_EPS_DEC = Decimal(str(GRID_EPS))
_HALF = Decimal("0.5")


@njit(cache=True)
def step_decimals(step: float) -> int:
    """Decimals d of a decimal step (0.01 -> 2, 0.005 -> 3, 5.0 -> 0): step·10^d is an integer."""
    scale = 1.0
    for d in range(_MAX_DECIMALS + 1):
        scaled = step * scale
        if abs(scaled - round(scaled)) <= 1e-9 * scaled:
            return d
        scale *= 10.0
    return _MAX_DECIMALS


@njit(cache=True)
def grid_index(value: float, step: float, direction: int) -> float:
    """Index n (an integer-valued float) of the grid point n·step the rule picks for `value`."""
    q = value / step
    nearest = math.floor(q + 0.5)
    if abs(q - nearest) <= GRID_EPS:
        return nearest
    if direction < 0:
        return math.floor(q)
    if direction > 0:
        return math.ceil(q)
    return math.floor(q + 0.5 + GRID_EPS)


@njit(cache=True)
def grid_indices(values: np.ndarray, step: float, direction: int) -> np.ndarray:
    """`grid_index` of each value (float64 array in, int64 array out): a book's levels in one call."""
    out = np.empty(len(values), dtype=np.int64)
    for i in range(len(values)):
        out[i] = int(grid_index(values[i], step, direction))
    return out


@njit(cache=True)
def grid_value(n: float, step: float) -> float:
    """The double nearest to the exact decimal n·step (integer mantissa product over a power of ten)."""
    scale = 10.0 ** step_decimals(step)
    return (n * round(step * scale)) / scale


@njit(cache=True)
def snap_round(value: float, step: float, direction: int) -> float:
    """`value` on the grid of `step` by the one rule (direction -1 floor, +1 ceil, 0 nearest ties up)."""
    return grid_value(grid_index(value, step, direction), step)


def snap_round_dec(value: float | str | Decimal, step: Decimal, direction: int) -> Decimal:
    """The same rule in Decimal, for the wire: exact multiple of `step`; floats are read by their repr.

    Raises ValueError for a value that is not a finite number.
    """
    v = value if isinstance(value, Decimal) else Decimal(str(value))
    if not v.is_finite():
        raise ValueError(f"cannot round {value!r} to the grid of {step}")
    q = v / step
    nearest = (q + _HALF).to_integral_value(rounding=ROUND_FLOOR)
    if abs(q - nearest) <= _EPS_DEC:
        n = nearest
    elif direction < 0:
        n = q.to_integral_value(rounding=ROUND_FLOOR)
    elif direction > 0:
        n = q.to_integral_value(rounding=ROUND_CEILING)
    else:
        n = (q + _HALF + _EPS_DEC).to_integral_value(rounding=ROUND_FLOOR)
    return n * step
