"""From a routing distribution and a capacity to drop rate and straggler load.

A routing group of T tokens sends each token to k distinct experts. Expert i is picked by a token
with probability q_i = k p_i (p the expert popularity, summing to 1), independently across tokens,
so its load is X_i ~ Binomial(T, q_i). With capacity C per expert:

* drop rate = sum_i E[max(X_i - C, 0)] / (T k)  (tokens past capacity are dropped);
* the most-loaded expert's expected load E[max_i X_i] = sum_x (1 - prod_i F_i(x)) sets the
  straggler of a dropless run; a device holding experts j..j+m carries the sum of their loads,
  Binomial(T, sum q) for the group (the multinomial covariance is negative, so this slightly
  overstates the spread).

Distributions: "balanced" (every expert exactly T k / E, as benchmarks that force balance),
"uniform" (p_i = 1/E, the default), a Zipf skew p_i ~ (i+1)^-s, or a measured histogram of
tokens per expert. Tests hold these against a Monte Carlo simulation of top-k routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special


@dataclass(frozen=True)
class Routing:
    """How tokens spread over experts: kind "balanced" | "uniform" | "zipf" | "histogram"."""

    kind: str = "uniform"
    skew: float = 0.0  # zipf exponent s
    histogram: tuple[float, ...] = ()  # measured tokens (or frequencies) per expert

    def __hash__(self) -> int:
        return hash((self.kind, self.skew, tuple(self.histogram)))

    def __post_init__(self) -> None:
        if self.kind not in ("balanced", "uniform", "zipf", "histogram"):
            raise ValueError(f"routing.kind: got {self.kind!r}; expected balanced, uniform, zipf or histogram")
        if self.kind == "zipf" and not self.skew > 0:
            raise ValueError(f"routing.skew: got {self.skew!r}; expected > 0 for a zipf distribution")
        if self.kind == "histogram":
            h = np.asarray(self.histogram, dtype=float)
            if h.size == 0 or np.any(h < 0) or h.sum() <= 0 or not np.all(np.isfinite(h)):
                raise ValueError("routing.histogram: expected non-negative counts per expert with a positive sum")

    def popularity(self, num_experts: int) -> np.ndarray:
        """p_i, sorted most popular first (so the first device holds the hottest experts)."""
        if self.kind in ("balanced", "uniform"):
            return np.full(num_experts, 1.0 / num_experts)
        if self.kind == "zipf":
            p = (np.arange(num_experts) + 1.0) ** -self.skew
        else:
            p = np.asarray(self.histogram, dtype=float)
            if p.size != num_experts:
                raise ValueError(f"routing.histogram: {p.size} entries; expected one per expert ({num_experts})")
        return np.sort(p / p.sum())[::-1]


NORMAL_ABOVE_VARIANCE = 1e5  # binomial variance past which the normal form replaces the exact one


def expected_excess(trials, prob, capacity):
    """E[max(X - c, 0)] for X ~ Binomial(n, p), in closed form (arrays welcome):
    n p P(Binomial(n - 1, p) >= c) - c P(X > c), from E[X 1{X >= k}] = n p P(Binomial(n-1, p) >= k - 1).

    The two terms are close near the mean and cancel in floating point for large groups (a group of 2^27 tokens
    gave 10x the drop rate), so past NORMAL_ABOVE_VARIANCE the normal form s phi(z) + (m - c) (1 - Phi(z)),
    z = (c - m) / s, is used; it agrees with the exact one to 1e-5 near the mean at that size. Upper tails are
    taken with bdtrc, not 1 - bdtr."""
    n = np.asarray(trials, dtype=np.int64)
    p = np.asarray(prob, dtype=float)
    c = np.minimum(np.asarray(capacity, dtype=float), n)  # a capacity past the group's tokens drops nothing
    mean, var = n * p, n * p * (1.0 - p)
    with np.errstate(invalid="ignore", divide="ignore"):
        upper_x = np.where(c <= 0, 1.0, special.bdtrc(np.maximum(c - 1.0, 0.0), np.maximum(n - 1, 0), p))
        exact = mean * upper_x - c * special.bdtrc(c, n, p)
        sd = np.sqrt(var)
        z = (c - mean) / np.maximum(sd, 1e-300)
        normal = sd * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi) + (mean - c) * special.ndtr(-z)
    return np.maximum(np.where(var > NORMAL_ABOVE_VARIANCE, normal, exact), 0.0)


def _binomial_cdf(x, n, p):
    """P(Binomial(n, p) <= x); past NORMAL_ABOVE_VARIANCE the normal form with a continuity correction (the
    incomplete beta function loses its precision for groups of billions of tokens)."""
    var = n * p * (1.0 - p)
    if var > NORMAL_ABOVE_VARIANCE:
        return special.ndtr((np.asarray(x, dtype=float) + 0.5 - n * p) / np.sqrt(var))
    return special.bdtr(x, n, p)


@dataclass(frozen=True)
class RoutingStats:
    drop_rate: float  # fraction of token-expert assignments dropped
    mean_expert_load: float  # T k / E
    max_expert_load: float  # expected load of the most-loaded expert (no capacity)
    max_device_load: float  # expected token-expert assignments on the most-loaded device
    mean_device_load: float


def _probabilities(routing: Routing, num_experts: int, top_k: int) -> np.ndarray:
    return np.minimum(routing.popularity(num_experts) * top_k, 1.0)


def _expected_max(trials: int, probs: np.ndarray, counts: np.ndarray) -> float:
    """E[max_i X_i], X_i ~ Binomial(trials, probs_i) independent: the sum over x of g(x) = 1 - prod F_i(x).

    Below lo = mean - 10 sd every term is 1 (to double precision), so the sum starts there; past
    mean + 10 sd every term is below E x 1e-23. g falls smoothly from 1 to 0 over a few sd with flat
    ends, so the trapezoid rule on every ``step``-th integer (step = sd / 4) matches the sum over every
    integer to about 1e-10 relative (Euler-Maclaurin: the end corrections vanish); a group of 2M
    tokens needs about 80 CDF evaluations per expert class instead of 20 sd. ``probs`` are distinct,
    ``counts`` says how many variables share each."""
    p_max = float(probs.max())
    sd = np.sqrt(trials * p_max * (1 - p_max) + 1.0)
    hi = int(min(trials, trials * p_max + 10.0 * sd + 2))
    lo = int(max(0.0, trials * p_max - 10.0 * sd))
    step = max(1, int(sd // 4))
    x = lo + step * np.arange(-(-(hi - lo) // step) + 1, dtype=float)
    log_cdf = np.zeros(x.size)  # log prod_i F_i(x)
    with np.errstate(divide="ignore"):
        for p, c in zip(probs, counts, strict=True):
            log_cdf += c * np.log(_binomial_cdf(x, trials, p))
    g = 1.0 - np.exp(log_cdf)
    ends = (g[0] + g[-1]) / 2.0
    return float(lo + step * (np.sum(g) - ends) + ends)


def routing_stats(tokens: int, num_experts: int, top_k: int, capacity: float | None,
                  experts_per_device: int = 1, routing: Routing | None = None, loads: bool = True) -> RoutingStats:
    """Drop rate and straggler loads for one routing group of ``tokens`` tokens (memoised).

    ``loads=False`` skips the expected maxima (NaN in the result) when only the drop rate is needed."""
    return _routing_stats(int(tokens), int(num_experts), int(top_k), None if capacity is None else float(capacity),
                          int(experts_per_device), routing or Routing(), bool(loads))


@lru_cache(maxsize=16384)
def _routing_stats(tokens: int, num_experts: int, top_k: int, capacity: float | None,
                   experts_per_device: int, routing: Routing, loads: bool) -> RoutingStats:
    tokens = int(tokens)
    if tokens < 1 or num_experts % experts_per_device:
        raise ValueError(f"routing: got tokens={tokens}, experts_per_device={experts_per_device}; expected "
                         f"tokens >= 1 and experts_per_device dividing num_experts ({num_experts})")
    mean = tokens * top_k / num_experts
    mean_dev = mean * experts_per_device
    if routing.kind == "balanced" or top_k == num_experts:  # top_k = E (a dense model): every expert gets every token
        drop = 0.0 if capacity is None else max(0.0, mean - capacity) / mean
        return RoutingStats(drop, mean, mean, mean_dev, mean_dev)
    q = _probabilities(routing, num_experts, top_k)
    drop = 0.0
    if capacity is not None:
        drop = float(np.sum(expected_excess(tokens, q, np.floor(capacity))) / (tokens * top_k))
    if not loads:
        return RoutingStats(drop, mean, float("nan"), float("nan"), mean_dev)
    return RoutingStats(drop, mean, max_device_load(tokens, num_experts, top_k, 1, routing),
                        max_device_load(tokens, num_experts, top_k, experts_per_device, routing), mean_dev)


@lru_cache(maxsize=16384)
def max_device_load(tokens: int, num_experts: int, top_k: int, experts_per_device: int, routing: Routing) -> float:
    """Expected token-expert assignments on the most-loaded device of ``experts_per_device`` experts
    (one expert: the busiest expert's load), memoised. A device's load is Binomial(T k, sum q / k)."""
    if routing.kind == "balanced" or top_k == num_experts:
        return tokens * top_k / num_experts * experts_per_device
    q = _probabilities(routing, num_experts, top_k)
    if experts_per_device == 1:
        return _expected_max(tokens, *_classes(q))
    return _expected_max(tokens * top_k, *_classes(q.reshape(-1, experts_per_device).sum(axis=1) / top_k))


def _classes(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct probabilities, how many of each): one class when they are all equal (uniform routing)."""
    if probs.min() == probs.max():
        return probs[:1], np.array([probs.size])
    return np.unique(probs, return_counts=True)


def simulate_routing(tokens: int, num_experts: int, top_k: int, capacity: float | None, experts_per_device: int,
                     routing: Routing | None = None, trials: int = 200, seed: int = 0) -> RoutingStats:
    """Monte Carlo twin of ``routing_stats``: sample top-k distinct experts per token by popularity."""
    routing = routing or Routing()
    rng = np.random.default_rng(seed)
    p = routing.popularity(num_experts)
    drops, max_e, max_d = [], [], []
    for _ in range(trials):
        if routing.kind == "balanced":
            loads = np.full(num_experts, tokens * top_k / num_experts)
        else:
            # Gumbel top-k = sampling k distinct experts with probability proportional to p
            keys = np.log(p)[None, :] + rng.gumbel(size=(tokens, num_experts))
            chosen = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
            loads = np.bincount(chosen.ravel(), minlength=num_experts).astype(float)
        if capacity is not None:
            drops.append(np.maximum(loads - np.floor(capacity), 0).sum() / (tokens * top_k))
        max_e.append(loads.max())
        max_d.append(loads.reshape(-1, experts_per_device).sum(axis=1).max())
    mean = tokens * top_k / num_experts
    return RoutingStats(float(np.mean(drops)) if drops else 0.0, mean, float(np.mean(max_e)),
                        float(np.mean(max_d)), mean * experts_per_device)
