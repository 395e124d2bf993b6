"""
The throughput benchmark of issue 7: mailx and Postfix side by side, driven
by smtp-source on loopback.  Run it with ``python -m benchmarks.run``; see
benchmarks/README.md.
"""
