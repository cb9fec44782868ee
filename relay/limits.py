"""Customer.io's size limits, in one place (the mapping, the planner and batching share them).

From Customer.io's documentation and its official SDK: one message at most 32 KB of JSON; a
batch request at most 500 KB, which the SDK closes at 475,000 bytes.
"""

from __future__ import annotations

from typing import Final

MAX_MESSAGE_BYTES: Final = 32768
"""Customer.io's limit for one message, in bytes of compact JSON."""

MAX_BATCH_BYTES: Final = 475_000
"""Where a batch closes: the official SDK's figure, headroom under the 500 KB request limit."""
