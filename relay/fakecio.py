"""Temporary alias of relay.testing.fakecio, for the importers not yet moved to that name.

``python -m relay.fakecio`` runs ``relay.testing.fakecio``'s server.
"""

from __future__ import annotations

import sys

from relay.testing.fakecio import (
    FAULT_KINDS,
    ITEM_TYPES,
    MAX_ITEM_BYTES,
    MAX_REQUEST_BYTES,
    NO_RESPONSE,
    STORING_FAULTS,
    Accepted,
    FakeCustomerIO,
    RequestRecord,
    main,
)

__all__ = [
    "FAULT_KINDS",
    "ITEM_TYPES",
    "MAX_ITEM_BYTES",
    "MAX_REQUEST_BYTES",
    "NO_RESPONSE",
    "STORING_FAULTS",
    "Accepted",
    "FakeCustomerIO",
    "RequestRecord",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
