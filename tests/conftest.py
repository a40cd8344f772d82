"""Runs the whole suite against the test instance of the local stack (devstack/config.py).

Selected here, before any test module reads the stack's configuration, so that no test (and no script a test
starts, which inherits the environment) writes into the stack a person runs ``scripts/run-local`` on.
"""

from devstack.config import use_instance

use_instance("test")
