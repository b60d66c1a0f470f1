"""A soak-and-chaos harness in the spirit of Jepsen and FoundationDB's simulation tests: three
tenants drive a mixed workload against a real stack while faults are injected on a schedule
drawn from one seed, and a checker tests the service's invariants throughout and at the end.

``bench/soak.py`` runs it for an hour; ``tests/test_soak.py`` for two minutes. The parts:
``stack`` (the processes, restartable), ``workload`` (what the tenants do), ``faults`` (what
goes wrong, when), ``checker`` (what must stay true), ``resources`` (memory and descriptors),
``journal`` (what happened, for the report and for each violation's context), ``report``
(the summary) and ``harness`` (runs them together)."""
