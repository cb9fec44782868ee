from __future__ import annotations

import itertools
import json
from itertools import chain, pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.batching import (
    DEFAULT_MAX_ITEMS,
    ENVELOPE_BYTES,
    MAX_BATCH_BYTES,
    MAX_MESSAGE_BYTES,
    SEPARATOR_BYTES,
    bisect,
    oversize,
    plan_batches,
    plan_chains,
)


def batch_bytes(sizes: list[int], batch: range) -> int:
    """What a batch costs as Customer.io's SDK measures it, by the rule the planner honours."""
    return ENVELOPE_BYTES + sum(sizes[i] for i in batch) + SEPARATOR_BYTES * max(len(batch) - 1, 0)


def test_constants() -> None:
    assert MAX_MESSAGE_BYTES == 32768
    assert MAX_BATCH_BYTES == 475_000
    assert DEFAULT_MAX_ITEMS == 100


SENT_AT = "2026-11-29T10:00:00.000000+00:00"
ITEMS = [
    {"type": "track", "event": "a", "properties": {"note": "naïve 🔥"}},
    {"type": "identify", "userId": "u", "traits": {"city": "Zürich"}},
    {"type": "track", "event": "b"},
]


def test_envelope_and_separators_are_a_batch_as_customerio_measures_it() -> None:
    # The SDK's measure: json.dumps of the request, with its ", " and ": " and ASCII escapes.
    sizes = [len(json.dumps(item)) for item in ITEMS]
    body = json.dumps({"batch": ITEMS, "sentAt": SENT_AT})
    assert len(body) == batch_bytes(sizes, range(len(ITEMS)))


def test_a_batch_on_the_wire_is_never_larger_than_its_measure() -> None:
    # The relay sends UTF-8, compact where it re-encodes: never more bytes than it budgeted.
    sizes = [len(json.dumps(item)) for item in ITEMS]
    compact = [json.dumps(i, separators=(",", ":"), ensure_ascii=False) for i in ITEMS]
    wire = '{"batch":[' + ",".join(compact) + '],"sentAt":"' + SENT_AT + '"}'
    assert len(wire.encode()) < batch_bytes(sizes, range(len(ITEMS)))


def test_empty_input_gives_no_batches() -> None:
    assert plan_batches([]) == []


def test_item_count_limit() -> None:
    assert plan_batches([10] * 250) == [range(0, 100), range(100, 200), range(200, 250)]
    assert plan_batches([10] * 5, max_items=2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_batches([10] * 3, max_items=1) == [range(0, 1), range(1, 2), range(2, 3)]


def test_a_batch_of_exactly_max_bytes_fits() -> None:
    # 20 items of 23,000 bytes plus a remainder item chosen to land on the limit exactly.
    sizes = [23_000] * 20
    last = MAX_BATCH_BYTES - ENVELOPE_BYTES - sum(sizes) - SEPARATOR_BYTES * len(sizes)
    assert 0 < last <= MAX_MESSAGE_BYTES
    sizes.append(last)
    assert batch_bytes(sizes, range(len(sizes))) == MAX_BATCH_BYTES
    assert plan_batches(sizes) == [range(0, 21)]


def test_one_byte_over_max_bytes_splits() -> None:
    sizes = [23_000] * 20
    sizes.append(MAX_BATCH_BYTES - ENVELOPE_BYTES - sum(sizes) - SEPARATOR_BYTES * len(sizes) + 1)
    assert plan_batches(sizes) == [range(0, 20), range(20, 21)]


def test_separators_are_counted() -> None:
    # Without the 99 separators this would fit one batch; with them it must not.
    max_bytes = ENVELOPE_BYTES + MAX_MESSAGE_BYTES
    size = MAX_MESSAGE_BYTES // 100
    sizes = [size] * 100
    assert ENVELOPE_BYTES + sum(sizes) <= max_bytes
    assert batch_bytes(sizes, range(100)) > max_bytes
    batches = plan_batches(sizes, max_bytes=max_bytes)
    assert len(batches) == 2
    assert all(batch_bytes(sizes, b) <= max_bytes for b in batches)


def test_largest_message_fits_alone_under_the_smallest_limit() -> None:
    max_bytes = ENVELOPE_BYTES + MAX_MESSAGE_BYTES
    sizes = [MAX_MESSAGE_BYTES, 1, MAX_MESSAGE_BYTES]
    assert plan_batches(sizes, max_bytes=max_bytes) == [range(0, 1), range(1, 2), range(2, 3)]


def test_order_is_preserved_when_a_small_item_could_fill_a_gap() -> None:
    # A packer that reordered would put item 2 beside item 0; the planner must not.
    max_bytes = ENVELOPE_BYTES + MAX_MESSAGE_BYTES
    sizes = [30_000, 5_000, 10]
    assert plan_batches(sizes, max_bytes=max_bytes) == [range(0, 1), range(1, 3)]


def test_oversize_item_raises_naming_its_index() -> None:
    with pytest.raises(ValueError, match=r"sizes\[2\]"):
        plan_batches([10, MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1])


def test_negative_size_raises_naming_its_index() -> None:
    with pytest.raises(ValueError, match=r"sizes\[1\]"):
        plan_batches([10, -1])


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_items"):
        plan_batches([10], max_items=0)
    with pytest.raises(ValueError, match="max_bytes"):
        plan_batches([10], max_bytes=ENVELOPE_BYTES + MAX_MESSAGE_BYTES - 1)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=MAX_MESSAGE_BYTES), max_size=400),
    max_items=st.integers(min_value=1, max_value=150),
    max_bytes=st.integers(min_value=ENVELOPE_BYTES + MAX_MESSAGE_BYTES, max_value=600_000),
)
def test_every_batch_fits_and_ranges_cover_all_items_in_order(
    sizes: list[int], max_items: int, max_bytes: int
) -> None:
    batches = plan_batches(sizes, max_items=max_items, max_bytes=max_bytes)
    assert list(chain.from_iterable(batches)) == list(range(len(sizes)))
    for batch in batches:
        assert batch.step == 1
        assert 1 <= len(batch) <= max_items
        assert batch_bytes(sizes, batch) <= max_bytes
    # Greedy: a batch closes only because the next item would break a limit.
    for batch, following in pairwise(batches):
        grown = range(batch.start, following.start + 1)
        assert len(grown) > max_items or batch_bytes(sizes, grown) > max_bytes


def test_oversize_detection() -> None:
    sizes = [10, MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1, 0, 10**6]
    assert oversize(sizes) == [2, 4]
    assert oversize([]) == []


@pytest.mark.parametrize(
    ("n", "first", "second"),
    [
        (2, range(0, 1), range(1, 2)),
        (3, range(0, 2), range(2, 3)),
        (100, range(0, 50), range(50, 100)),
        (101, range(0, 51), range(51, 101)),
    ],
)
def test_bisect(n: int, first: range, second: range) -> None:
    assert bisect(n) == (first, second)


@given(st.integers(min_value=2, max_value=10_000))
def test_bisect_halves_cover_the_batch(n: int) -> None:
    first, second = bisect(n)
    assert list(first) + list(second) == list(range(n))
    assert len(first) - len(second) in (0, 1)
    assert len(second) >= 1


@pytest.mark.parametrize("n", [1, 0, -1])
def test_bisect_needs_two_items(n: int) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        bisect(n)


# --- plan_chains: batches that share no customer ------------------------------------------


def _flatten(chains: list[list[range]]) -> list[int]:
    return [i for batches in chains for r in batches for i in r]


def test_chains_pack_whole_customers_and_never_share_one() -> None:
    keys = ["a"] * 3 + ["b"] * 4 + ["c"] * 2 + ["d"] * 5
    chains = plan_chains(keys, [10] * len(keys), max_items=5)
    # a(3) fits, b(4) does not fit beside a -> new batch; c(2) does not fit beside b; d(5) alone
    assert chains == [[range(0, 3)], [range(3, 7)], [range(7, 9)], [range(9, 14)]]
    owners = [{keys[i] for r in batches for i in r} for batches in chains]
    for x, y in itertools.combinations(owners, 2):
        assert not x & y


def test_a_customer_bigger_than_a_batch_is_its_own_ordered_chain() -> None:
    keys = ["a"] + ["big"] * 12 + ["c"]
    chains = plan_chains(keys, [10] * len(keys), max_items=5)
    assert chains == [
        [range(0, 1)],
        [range(1, 6), range(6, 11), range(11, 13)],
        [range(13, 14)],
    ]


@given(
    st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(1, 40)), min_size=1, max_size=60),
    st.integers(1, 8),
)
def test_chains_cover_every_item_once_in_order_within_limits(
    groups: list[tuple[str, int]], max_items: int
) -> None:
    keys: list[str] = []
    for n, (key, count) in enumerate(groups):
        keys += [f"{key}{n}"] * (count % 9 + 1)
    sizes = [100 + (i * 37) % 900 for i in range(len(keys))]
    chains = plan_chains(keys, sizes, max_items=max_items, max_bytes=ENVELOPE_BYTES + 40_000)
    assert _flatten(chains) == list(range(len(keys)))
    seen: dict[str, int] = {}
    for c, batches in enumerate(chains):
        for r in batches:
            assert 1 <= len(r) <= max_items
            assert batch_bytes(sizes, r) <= ENVELOPE_BYTES + 40_000
            for i in r:
                assert seen.setdefault(keys[i], c) == c  # a customer lives in one chain
