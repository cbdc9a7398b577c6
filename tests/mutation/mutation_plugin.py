"""pytest plugin (`-p mutation_plugin`): applies the mutant named by $NF4Q_MUTANT before any test runs.

tests/mutation/run.py loads it in each subprocess; a mutant that no longer applies (StaleMutant) stops the
session with exit status 4 (usage error), which run.py reports as STALE, never as killed.
"""
import os

import pytest


def pytest_configure(config):
    name = os.environ.get("NF4Q_MUTANT")
    if not name:
        return
    import mutants

    try:
        mutants.apply(name)
    except mutants.StaleMutant as e:
        raise pytest.UsageError(f"stale mutant {name}: {e}") from None
    config.stash[_KEY] = name


_KEY = pytest.StashKey[str]()


def pytest_report_header(config):
    name = config.stash.get(_KEY, None)
    return f"nf4q mutant: {name}" if name else None
