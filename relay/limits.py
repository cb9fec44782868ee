"""Limits the relay enforces before Customer.io or PostgreSQL would, in one place, and the
one way sizes are measured.

Sizes are Customer.io's: from its documentation and its official SDK, one message at most 32 KB
of JSON and a batch request at most 500 KB, which the SDK closes at 475,000 bytes. The SDK
measures a message as ``len(json.dumps(msg))``: json's defaults, so ``", "`` and ``": "``
between members and every character outside printable ASCII written as a ``\\uXXXX`` escape
(one "é" counts 6 bytes, a character outside the Basic Multilingual Plane 12, as a surrogate
pair). The relay judges every size that way (``message_size``, ``text_size``), whatever it
puts on the wire: it may send UTF-8 and compact separators, which are never longer, so a
message judged within the limit is within it however it travels.

Key lengths are PostgreSQL's: a btree index entry must stay under 2,704 bytes (8 kB pages),
and a key that lands in an indexed column is refused by ``record_event`` well before that,
measured in UTF-8 bytes as PostgreSQL stores text.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Final

MAX_MESSAGE_BYTES: Final = 32768
"""Customer.io's limit for one message, measured as its SDK does (``message_size``)."""

MAX_BATCH_BYTES: Final = 475_000
"""Where a batch closes: the official SDK's figure, headroom under the 500 KB request limit."""

# Each bound below is far above any real identifier (a UUID is 36 bytes, an email address at
# most 254) and far below what a btree takes: the largest entry, a key of 1,024 bytes in
# (customer_key, id), is 8 (tuple header) + 4 (text header) + 1,024 + 8 (bigint) = 1,044 bytes
# of the 2,704 a btree entry may hold, without counting on PostgreSQL compressing it.

MAX_CUSTOMER_KEY_BYTES: Final = 1024
"""Longest ``customer.id`` and ``customer.email`` (either may be the ``userId``, stored as
``relay_outbox.customer_key``: indexed with ``id`` by ``relay_outbox_customer_unfinished_idx``
and ``relay_outbox_customer_key_idx``), in UTF-8 bytes."""

MAX_PROJECT_ID_BYTES: Final = 1024
"""Longest ``customer.project_id`` (``relay_outbox.project_id``, indexed by
``relay_outbox_held_idx`` when a row is held; the key of ``relay_destination`` and
``relay_throttle``), in UTF-8 bytes. The planner declares a stored row with a longer one dead
(``relay.plan``): held, it could not be indexed, and the claim that tried would fail."""

MAX_EVENT_ID_BYTES: Final = 1024
"""Longest event ``id`` (``relay_outbox.event_id``), in UTF-8 bytes. The indexed
``message_id`` is a UUID derived from it, 36 bytes whatever its length; the event id itself is
stored on every row and shown by every operator view, so it is bounded like the other keys.
The event ``type`` needs no bound: it must be one of the known types."""

# json.dumps' defaults, as the SDK calls it. NaN never reaches here (the mapping refuses it and
# jsonb cannot hold it); allow_nan=False makes a mistake loud rather than a bad measure.
_SDK_JSON: Final = json.JSONEncoder(allow_nan=False, check_circular=False)
# A float json writes with an exponent (``1e-07``, ``1e+16``), the only spelling jsonb changes,
# where json.dumps puts a value: after "[" or the space of ", " and ": ". The same characters
# inside a string only cost a needless walk; a UUID's "8e-4" (no space before) does not.
_EXPONENT: Final = re.compile(r"[ \[]-?[0-9]+(?:\.[0-9]+)?e[-+][0-9]")


def sdk_json(value: object) -> str:
    """``value`` written as Customer.io's SDK writes it: ``json.dumps(value)``, pure ASCII."""
    return _SDK_JSON.encode(value)


def message_size(value: object, written: str | None = None) -> int:
    """Customer.io's measure of ``value`` once stored in jsonb: ``len(json.dumps(value))``
    with each float spelled as jsonb prints it.

    jsonb keeps numbers as ``numeric``, which prints without an exponent: ``1e300`` comes back
    as 301 digits, ``1e-07`` as ``0.0000001``. The relay sends what the outbox holds, so a
    size that did not count that spelling would pass a message that dies unsent. ``written``
    is ``sdk_json(value)`` when the caller already has it.
    """
    text = sdk_json(value) if written is None else written
    if ("e-" not in text and "e+" not in text) or _EXPONENT.search(text) is None:
        return len(text)
    return len(text) + _float_growth(value)


def text_size(text: str) -> int:
    """Customer.io's measure of a JSON text already written with json's default separators
    (``", "`` and ``": "``), as jsonb's text form is: its length once every character outside
    printable ASCII is a ``\\uXXXX`` escape, as ``json.dumps`` would write it.

    Counted, not re-encoded: a valid JSON text holds no raw control character, so only DEL
    (U+007F) and non-ASCII characters grow, to 6 bytes each, or 12 for a character that needs
    a surrogate pair. ASCII text, the common case, costs one scan for DEL.
    """
    dels = text.count("\x7f")
    if text.isascii():
        return len(text) + 5 * dels
    ascii_chars = len(text.encode("ascii", "ignore"))
    # UTF-16 code units: one per character of the Basic Multilingual Plane, two for the rest,
    # exactly as many as json writes \uXXXX escapes for the non-ASCII ones.
    utf16_units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    return ascii_chars + 5 * dels + 6 * (utf16_units - ascii_chars)


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8, as PostgreSQL stores it."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _float_growth(value: object) -> int:
    if isinstance(value, float):
        return len(format(Decimal(repr(value)), "f")) - len(repr(value))
    if isinstance(value, dict):
        return sum(_float_growth(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_float_growth(v) for v in value)
    return 0
