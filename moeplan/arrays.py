"""numpy's elementwise maximum, minimum, where and gcd, keeping Python numbers Python numbers.

The cost formulas run on grids of candidates (numpy arrays) and on one candidate (plain Python
numbers, ``estimate()``). Python arithmetic on the latter is several times cheaper than numpy
scalars, and these are the numpy functions the formulas call on it. NaN propagates as in numpy.
"""

from __future__ import annotations

import math

import numpy as np


def maximum(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return a if a >= b or a != a else b


def minimum(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.minimum(a, b)
    return a if a <= b or a != a else b


def where(condition, a, b):
    if isinstance(condition, np.ndarray) or isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.where(condition, a, b)
    return a if condition else b


def gcd(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.gcd(a, b)
    return math.gcd(int(a), int(b))
