"""trainfleet benchmarks: every figure is printed beside a baseline measured in the same run.

Run ``python -m bench`` (or ``make bench``); ``--quick`` for a smoke-sized run,
``--full`` adds the 1 GiB artifact and the 100k-job / 200-agent scale run,
``--only NAME ...`` picks benchmarks. See BENCHMARKS.md for recorded results.
"""
