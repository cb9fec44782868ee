"""Stand-ins the relay ships for running it without the real services.

``relay.testing.fakecio`` is a local HTTP server that behaves like Customer.io's CDP API
(strict mode, limits, injected faults). It is part of the installed package, not of the test
suite, because more than the tests run on it: ``relay demo`` delivers to it, the benchmarks
(``bench/``) each start one, and ``compose.yaml`` runs it in place of Customer.io
(``python -m relay.testing.fakecio``). Standard library only; nothing on the delivery path
(the daemon, the client) imports it.

This package imports nothing itself: ``python -m relay.testing.fakecio`` must find the module
not yet loaded, or runpy would run a second copy of it beside the first.
"""
