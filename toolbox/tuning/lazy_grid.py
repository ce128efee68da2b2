"""A sweep's grid points drawn one at a time, as trials start, in the order and with the draws of Tune's own.

Tune's ``BasicVariantGenerator`` draws every point of the grid before its first trial starts, each
from a deep copy of the whole space (grid value lists included): a grid of 10^5 values never gets to
a trial. ``GridPoints`` yields the same points lazily, copying the space without its value lists, and
is saved with the searcher's state (its position and the points drawn but not yet taken), so that a
re-run continues where the sweep stopped.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from ray.tune.search import basic_variant
from ray.tune.search.variant_generator import _get_value, assign_value, generate_variants, parse_spec_vars


class GridPoints:
    """The points of ``spec``'s grid (its first grid key, by Tune's sort, varying fastest), each with its other
    values drawn from ``random_state``: ``(resolved_vars, spec)`` pairs, as ``generate_variants`` yields them."""

    def __init__(self, spec: dict, random_state: Any = None):
        self.spec, self.random_state = spec, random_state
        self.grid = [(path, list(domain.categories)) for path, domain in parse_spec_vars(spec)[2]]
        self.total = math.prod(len(values) for _, values in self.grid)
        self.position, self.drawn = 0, []

    def has_next(self) -> bool:
        return bool(self.drawn) or self.position < self.total

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, dict]:
        if not self.drawn:
            if self.position >= self.total:
                raise StopIteration
            self.drawn = list(self._draw(self.position))
            self.position += 1
        return self.drawn.pop(0)

    def _draw(self, index: int):
        chosen = []
        for path, values in self.grid:
            index, at = divmod(index, len(values))
            chosen.append((path, values[at]))
        skip = {id(_get_value(self.spec, path)): None for path, _ in self.grid}  # the value lists are not copied
        spec = copy.deepcopy(self.spec, skip)
        for path, value in chosen:
            assign_value(spec, path, value)
        for resolved, variant in generate_variants(spec, random_state=self.random_state):
            yield {**resolved, **dict(chosen)}, variant


class Variants(basic_variant._VariantIterator):
    """Tune's iterator over a trial's variants, lazy and savable over ``GridPoints``; as Tune's over a list."""

    def __init__(self, iterable, lazy_eval: bool = False):
        if not isinstance(iterable, GridPoints):
            super().__init__(iterable, lazy_eval)
            return
        self.lazy_eval, self.iterable, self._has_next = False, iterable, iterable.has_next()

    def __next__(self):
        if not isinstance(self.iterable, GridPoints):
            return super().__next__()
        point = next(self.iterable)
        self._has_next = self.iterable.has_next()
        return point


def grid_points(unresolved_spec: dict, constant_grid_search: bool = False, random_state: Any = None):
    """What Tune's trial iterator calls for a sample's variants: ``GridPoints``, unless the random values are
    drawn once for the whole grid (``constant_grid_search``), which Tune's own generator does."""
    if constant_grid_search:
        return generate_variants(unresolved_spec, constant_grid_search, random_state)
    return GridPoints(unresolved_spec, random_state)
