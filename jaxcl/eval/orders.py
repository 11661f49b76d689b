"""Task (or domain) orders for continual-learning comparisons.

Forgetting in continual learning depends on which task follows which: a task loses accuracy when a
later task resembles it. A single order therefore measures one pairing, and papers (SLM, IDBR,
ProgPrompt) average over several orders. `balanced_orders` gives a Williams design: every task sits
in every position equally often and every ordered pair (a immediately followed by b) occurs equally
often, so no pair of look-alike tasks is favoured by the choice of orders.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def balanced_orders(items: Sequence[T], count: int | None = None) -> list[tuple[T, ...]]:
    """Williams-design orders of `items`, the first one being `items` itself.

    n items give n orders for even n and 2n for odd n > 1 (the square and its mirror); `count` keeps the
    first `count` of them (then the balance holds only approximately). Every order is a permutation
    of `items`; each item is at each position once per square; each ordered adjacent pair (a, b) occurs
    once (even n) or twice (odd n, over both squares).
    """
    items = tuple(items)
    n = len(items)
    if n == 0:
        raise ValueError("balanced_orders needs at least one task")
    if len(set(items)) != n:
        raise ValueError(f"balanced_orders: tasks must be distinct, got {list(items)}")
    # First row of the standard construction: 0, 1, n-1, 2, n-2, ... ; row r adds r (mod n).
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(v + r) % n for v in first] for r in range(n)]
    if n % 2 and n > 1:
        rows += [row[::-1] for row in rows]
    # Relabel so that row 0 is `items` in its given order.
    label = {index: items[pos] for pos, index in enumerate(first)}
    orders = [tuple(label[v] for v in row) for row in rows]
    if count is not None:
        if not 1 <= count <= len(orders):
            raise ValueError(f"count={count}: choose 1..{len(orders)} orders for {n} tasks")
        orders = orders[:count]
    return orders


__all__ = ["balanced_orders"]
