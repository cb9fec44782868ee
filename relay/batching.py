"""Cutting a run of encoded messages into ``/v1/batch`` requests that Customer.io accepts.

Pure functions over byte sizes: the caller encodes each message once, passes the sizes, and
slices its own list with the ranges returned. Sizes are Customer.io's measure
(``relay.limits``: ``len(json.dumps(msg))``, ASCII escapes and ``", "`` separators), and so is
the request around them, so a batch that fits here fits however the SDK would count it; the
relay's wire form (UTF-8, compact where it re-encodes) is never longer. Ranges are
consecutive and in send order, because the caller relies on that order for each customer's
messages (an identify before the tracks that follow it).

With ``X-Strict-Mode: 1`` an over-limit request is a ``400`` for the whole batch, so the limits
are enforced here, before sending, rather than discovered by bisecting.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.limits import MAX_BATCH_BYTES, MAX_MESSAGE_BYTES

# The official SDK's item limit per batch.
DEFAULT_MAX_ITEMS = 100

# The bytes a batch costs besides its items, as json.dumps writes the request: the wrapper and
# ``sentAt`` with the longest timestamp the relay writes (microseconds and a numeric offset).
# The separator between items is not in here; ``plan_batches`` adds one per item after the
# first. A batch-level "context" would have to be added to this figure.
_ENVELOPE = '{"batch": [], "sentAt": "2026-11-29T10:00:00.000000+00:00"}'
ENVELOPE_BYTES = len(_ENVELOPE)

# json.dumps' item separator, ", ".
SEPARATOR_BYTES = 2


def oversize(sizes: Sequence[int]) -> list[int]:
    """Indexes of the items Customer.io would reject for size alone.

    Such a message can never be delivered, alone or in a batch; the caller marks it dead
    rather than letting it fail a batch with the good messages in it.
    """
    return [i for i, size in enumerate(sizes) if size > MAX_MESSAGE_BYTES]


def plan_batches(
    sizes: Sequence[int],
    max_items: int = DEFAULT_MAX_ITEMS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> list[range]:
    """Split items, in order, into consecutive batches that fit both limits.

    ``sizes[i]`` is item ``i``'s size as Customer.io measures it. Each returned range is one
    batch: ``ENVELOPE_BYTES + sum(sizes) + SEPARATOR_BYTES * (len - 1)`` is at most
    ``max_bytes``, and it holds between 1 and ``max_items`` items. Concatenated, the ranges are
    ``range(len(sizes))``.

    Batches are filled greedily: a batch closes only when the next item would break a limit.
    Packing out of order could make fewer requests but would reorder a customer's messages.

    Raises ``ValueError`` for an item over ``MAX_MESSAGE_BYTES`` or of negative size (naming its
    index; filter with ``oversize`` first), and for limits under which some deliverable message
    could not be sent at all.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items!r}")
    # Guarantees that any message within Customer.io's limit fits a batch on its own, so every
    # batch holds at least one item and still fits ``max_bytes``.
    smallest_max_bytes = ENVELOPE_BYTES + MAX_MESSAGE_BYTES
    if max_bytes < smallest_max_bytes:
        raise ValueError(
            f"max_bytes must be >= {smallest_max_bytes} (envelope + one largest message), "
            f"got {max_bytes!r}"
        )

    batches: list[range] = []
    start = 0
    used = ENVELOPE_BYTES
    for i, size in enumerate(sizes):
        if size < 0:
            raise ValueError(f"sizes[{i}] is negative: {size}")
        if size > MAX_MESSAGE_BYTES:
            raise ValueError(
                f"sizes[{i}] is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte message limit"
            )
        count = i - start
        separator = SEPARATOR_BYTES if count else 0
        if count and (count >= max_items or used + separator + size > max_bytes):
            batches.append(range(start, i))
            start, used, separator = i, ENVELOPE_BYTES, 0
        used += separator + size
    if start < len(sizes):
        batches.append(range(start, len(sizes)))
    return batches


def plan_chains(
    keys: Sequence[str],
    sizes: Sequence[int],
    max_items: int = DEFAULT_MAX_ITEMS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> list[list[range]]:
    """Batches that share no customer, so they can be sent at the same time.

    ``keys[i]`` is item ``i``'s customer; a customer's items are consecutive, in write order.
    Whole customers are packed into batches (in order, greedily). Each returned chain is a list
    of batches that must go one after another: a chain of one batch for packed customers, or,
    for a customer whose items do not fit one batch, that customer's own batches in order.
    Different chains never hold the same customer, so sending chains concurrently keeps every
    customer's order. Concatenated, all ranges cover ``range(len(sizes))`` exactly once.
    """
    if len(keys) != len(sizes):
        raise ValueError("keys and sizes must have the same length")
    groups: list[range] = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            groups.append(range(start, i))
            start = i
    chains: list[list[range]] = []
    current: range | None = None
    used = ENVELOPE_BYTES
    for group in groups:
        group_sizes = [sizes[i] for i in group]
        group_bytes = sum(group_sizes) + SEPARATOR_BYTES * (len(group) - 1)
        if len(group) > max_items or ENVELOPE_BYTES + group_bytes > max_bytes:
            # Too big for one batch: its own chain, split in order.
            offset = group.start
            chains.append(
                [
                    range(offset + r.start, offset + r.stop)
                    for r in plan_batches(group_sizes, max_items, max_bytes)
                ]
            )
            current = None  # the next customer starts a new batch after this chain
            continue
        if current is not None and (
            len(current) + len(group) <= max_items
            and used + SEPARATOR_BYTES + group_bytes <= max_bytes
        ):
            current = range(current.start, group.stop)
            used += SEPARATOR_BYTES + group_bytes
            chains[-1] = [current]
            continue
        current = group
        used = ENVELOPE_BYTES + group_bytes
        chains.append([current])
    return chains


def bisect(n: int) -> tuple[range, range]:
    """Split a rejected batch of ``n`` items into two halves, the first taking the odd item.

    A ``400`` names no message, so the caller re-sends each half: the half that succeeds is
    delivered, the half that fails is split again, until the bad messages stand alone. Each bad
    message costs about log2(n) extra requests and never holds the good ones back.
    """
    if n < 2:
        raise ValueError(f"a batch needs at least 2 items to bisect, got {n!r}")
    middle = (n + 1) // 2
    return range(0, middle), range(middle, n)
