"""Pareto fronts of points scored on several objectives, each to be minimized or maximized.

A point dominates another when it is at least as good on every objective and better on one. The
first front holds the points nothing dominates; each later front those that only earlier fronts do.
MO-ASHA's rungs and a multi-objective sweep's results rank by these fronts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point, modes: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every objective and better on one."""
    signed = [(x, y) if mode == "max" else (-x, -y) for x, y, mode in zip(a, b, modes, strict=True)]
    return all(x >= y for x, y in signed) and any(x > y for x, y in signed)


def pareto_fronts(points: Sequence[Point], modes: Sequence[str]) -> list[int]:
    """Each point's front, 1 for the non-dominated (non-dominated sorting, as NSGA-II's)."""
    dominated_by = [0] * len(points)  # how many points dominate each
    dominating: list[list[int]] = [[] for _ in points]  # the points each dominates
    for i, a in enumerate(points):
        for j in range(i + 1, len(points)):
            if dominates(a, points[j], modes):
                dominating[i].append(j)
                dominated_by[j] += 1
            elif dominates(points[j], a, modes):
                dominating[j].append(i)
                dominated_by[i] += 1
    fronts = [0] * len(points)
    current = [i for i, count in enumerate(dominated_by) if count == 0]
    rank = 1
    while current:
        following = []
        for i in current:
            fronts[i] = rank
            for j in dominating[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    following.append(j)
        current, rank = following, rank + 1
    return fronts


def crowding_distances(points: Sequence[Point]) -> list[float]:
    """NSGA-II's crowding distance of each point within its front: the larger, the lonelier (the ends are infinite)."""
    distances = [0.0] * len(points)
    if len(points) <= 2:
        return [math.inf] * len(points)
    for objective in range(len(points[0])):
        order = sorted(range(len(points)), key=lambda i: points[i][objective])
        low, high = points[order[0]][objective], points[order[-1]][objective]
        distances[order[0]] = distances[order[-1]] = math.inf
        if high == low:
            continue
        for before, i, after in zip(order, order[1:], order[2:]):
            distances[i] += (points[after][objective] - points[before][objective]) / (high - low)
    return distances


def pareto_order(points: Sequence[Point], modes: Sequence[str]) -> list[int]:
    """The points' indices best first: by front, and within a front the lonelier first (crowding distance)."""
    fronts = pareto_fronts(points, modes)
    crowding = [0.0] * len(points)
    for front in set(fronts):
        members = [i for i, f in enumerate(fronts) if f == front]
        for i, distance in zip(members, crowding_distances([points[i] for i in members])):
            crowding[i] = distance
    return sorted(range(len(points)), key=lambda i: (fronts[i], -crowding[i], i))
