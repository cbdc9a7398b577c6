"""benchmarks.utils.bench_rotated: timings taken in rotated order, so that no function is always timed right after
the one that heats the GPU (no GPU needed: a fake timer models the clock drop)."""
from benchmarks.utils import bench_rotated


def heated_timer(base, hot="cublas", slowdown=1.08):
    """A timer whose function runs `slowdown` times slower when timed right after `hot`; it records the order."""
    order = []

    def timer(fn):
        t = base[fn.__name__] * (slowdown if order and order[-1] == hot else 1.0)
        order.append(fn.__name__)
        return t

    return timer, order


def named(name):
    def fn():
        return None
    fn.__name__ = name
    return fn


def test_every_function_gets_one_timing_not_after_the_heavy_one():
    base = {"cublas": 300.0, "nf4q": 280.0, "bnb": 500.0}
    timer, order = heated_timer(base)
    got = bench_rotated({name: named(name) for name in base}, rounds=2, timer=timer)
    assert got == base
    assert sorted(order) == sorted(list(base) * 2)  # each timed once per round
    # a single pass in the fixed order would have read nf4q 8% slow
    timer, _ = heated_timer(base)
    single = bench_rotated({name: named(name) for name in base}, rounds=1, timer=timer)
    assert single["nf4q"] > base["nf4q"] * 1.07
