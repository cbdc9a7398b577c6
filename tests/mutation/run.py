"""Mutation testing for nf4q: run each mutant of mutants.py against the tests listed for it; print killed/survived.

    /work/venv/bin/python tests/mutation/run.py                 # every mutant (+ a baseline run of the same tests)
    /work/venv/bin/python tests/mutation/run.py replay. ewc.    # mutants whose name starts with one of these
    /work/venv/bin/python tests/mutation/run.py --list          # names, tests and what each mutant breaks

Each mutant runs in its own `python -m pytest -x` subprocess with $NF4Q_MUTANT set and the plugin
mutation_plugin.py loaded, which patches the imported code before the tests run: nothing in the repo is edited.
Exit status: 0 when every mutant is killed, 1 when one survives (or is stale, or the baseline fails).
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import mutants  # noqa: E402

# pytest's exit statuses: 0 all passed, 1 some failed, 2 interrupted, 3 internal error, 4 usage error, 5 no tests
KILLED, SURVIVED = 1, 0


def pytest_cmd(tests, extra=()):
    return [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "--no-header", "-p", "no:cacheprovider",
            "-p", "mutation_plugin", "-W", "ignore::pytest.PytestUnraisableExceptionWarning", *extra, *tests]


def run_pytest(tests, mutant=None, timeout=900):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("NF4Q_MUTANT", None)
    if mutant:
        env["NF4Q_MUTANT"] = mutant
    start = time.perf_counter()
    try:
        proc = subprocess.run(pytest_cmd(tests), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.perf_counter() - start
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def first_failure(output):
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return m.group(1) if m else ""


def check(names):
    """Apply each mutant's edits in this process without installing them: finds stale mutants in seconds."""
    mutants.load()
    mutants.install = mutants.kernel = lambda *a, **k: None  # compile the mutated code, patch nothing
    stale = []
    for n in names:
        try:
            mutants.MUTANTS[n][0]()
        except mutants.StaleMutant as e:
            stale.append(n)
            print(f"{n:40s} STALE     {e}")
    print(f"{len(names) - len(stale)}/{len(names)} mutants apply to the current source")
    return 1 if stale else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefixes", nargs="*", help="run only mutants whose name starts with one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant still applies to the current source (fast, no tests)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output of survivors")
    args = parser.parse_args(argv)

    names = [n for n in mutants.MUTANTS if not args.prefixes or n.startswith(tuple(args.prefixes))]
    if not names:
        parser.error(f"no mutant starts with {args.prefixes}")
    if args.list:
        for n in names:
            _, tests, why = mutants.MUTANTS[n]
            print(f"{n:40s} {why}\n{'':40s} tests: {' '.join(tests)}")
        return 0

    if args.check:
        return check(names)

    bad = []
    if not args.no_baseline:  # a mutant only counts as killed if the same tests pass without it
        tests = list(dict.fromkeys(t for n in names for t in mutants.MUTANTS[n][1]))
        rc, out, secs = run_pytest(tests)
        print(f"{'baseline (no mutant)':40s} {'passed' if rc == 0 else 'FAILED'}  {secs:5.0f} s", flush=True)
        if rc != 0:
            print(out[-3000:])
            return 1

    for n in names:
        _, tests, _ = mutants.MUTANTS[n]
        rc, out, secs = run_pytest(tests, mutant=n)
        if rc == KILLED:
            verdict = f"killed    by {first_failure(out)}"
        elif rc == SURVIVED:
            verdict = "SURVIVED"
        elif rc == 4 and "stale mutant" in out:
            verdict = "STALE     " + re.search(r"stale mutant .*", out).group(0)[:150]
        else:
            verdict = f"ERROR     pytest exit {rc}: {first_failure(out) or out.strip().splitlines()[-1:]}"
        print(f"{n:40s} {verdict}  ({secs:.0f} s)", flush=True)
        if rc != KILLED:
            bad.append(n)
            if args.verbose:
                print(out[-3000:])
    print(f"\n{len(names) - len(bad)}/{len(names)} mutants killed" + (f"; not killed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
