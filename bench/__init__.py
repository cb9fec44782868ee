"""Benchmarks of the outbox write path (``bench.record_event``) and the relay's drain rate
(``bench.drain``). See bench/README.md for how to run them and what each figure means."""
