"""Local development stack: real services started from Debian, Maven Central and PyPI packages.

Not shipped with the pipeline package; used by ``scripts/stack``, the test harness and the local run.
"""
