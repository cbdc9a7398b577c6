"""Inside one training step of benchmarks/bench_train.py: a torch.profiler summary (host vs GPU time, kernels per
step) and a CUDA memory snapshot with what is alive at its peak.

The snapshot's allocator trace is replayed (alloc adds a block, free_completed removes it) to find the moment the
most bytes were allocated, then the blocks alive at that moment are grouped by allocation site: the outermost aten
op and autograd node of the C++ stack, the innermost Python frames outside torch. Blocks allocated before recording
started (weights, optimizer state) have no trace entry: they are the `baseline` the caller measured.
Phase markers: a one-element allocation made by a function named `_phase_marker` (bench_train) starts the next
phase ("forward", "backward", ...), so each block is tagged with the phase that allocated it.

    python -m benchmarks.train_diagnostics snap.pickle [--top 15]     # analyse a saved snapshot again
"""
import argparse
import collections
import json
import math
import os
import pickle
import re
import time

import torch

from benchmarks import bench_train

MARKER = "_phase_marker"
_OP = re.compile(r"at::_ops::(\w+?)::(?:call|redispatch)")
_NODE = re.compile(r"(\w+Backward\d*)::apply|torch::autograd::(PyNode|CppNode)")
_NF4Q = re.compile(r"\bnf4q::([\w:]+)")


def _gib(n):
    return f"{n / 2**30:.3f} GiB" if abs(n) >= 2**28 else f"{n / 2**20:.1f} MiB"


def _is_py(f):
    return f.get("filename", "").endswith(".py")


def _internal(filename):
    return "/torch/" in filename or filename.startswith("<")


def _demangled_op(name):
    """at::_ops::X from a demangled or an Itanium-mangled C++ symbol (dladdr may give either)."""
    m = _OP.search(name)
    if m:
        return m.group(1)
    m = re.search(r"2at4_ops(\d+)", name)
    if m:
        start = m.end()
        return name[start:start + int(m.group(1))]
    return None


def site(frames):
    """A short label for where a block was allocated."""
    cpp = [f for f in frames if not _is_py(f)]
    ops = [op for op in (_demangled_op(f.get("name", "")) for f in cpp) if op]
    node = next((m.group(1) or m.group(2) for f in cpp for m in [_NODE.search(f.get("name", ""))] if m), None)
    nf = next((m.group(1) for f in cpp for m in [_NF4Q.search(f.get("name", ""))] if m), None)
    py = [f for f in frames if _is_py(f) and not _internal(f["filename"])]
    where = " < ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in py[:2])
    parts = [p for p in (f"op {ops[-1]}" if ops else None, f"node {node}" if node else None,
                         f"nf4q::{nf}" if nf else None) if p]
    if not where:
        internal = [f for f in frames if _is_py(f)]
        where = ("(torch: " + ", ".join(f"{os.path.basename(f['filename'])}:{f['name']}" for f in internal[:2]) + ")"
                 if internal else "(no Python frame: autograd engine or C++)")
    return (" ".join(parts) + " @ " if parts else "") + where


def slim(snapshot):
    """The snapshot with only the frames site() reads (Python ones, aten ops, autograd nodes, nf4q): C++ stacks are
    50-100 frames per event, most of them allocator and interpreter internals. In place; returns it."""
    keep = re.compile(f"{_OP.pattern}|{_NODE.pattern}|{_NF4Q.pattern}|2at4_ops|{MARKER}")

    def cut(frames):
        return [f for f in frames if _is_py(f) or keep.search(f.get("name", ""))]

    for trace in snapshot.get("device_traces", []):
        for e in trace:
            if "frames" in e:
                e["frames"] = cut(e["frames"])
    for seg in snapshot.get("segments", []):
        for block in seg.get("blocks", []):
            for h in block.get("history", []) or []:
                if "frames" in h:
                    h["frames"] = cut(h["frames"])
            if "frames" in block:
                block["frames"] = cut(block["frames"])
    return snapshot


def _trace(snapshot, device=None):
    traces = snapshot.get("device_traces", [])
    if device is not None:
        return traces[device] if device < len(traces) else []
    return max(traces, key=len) if traces else []


def _is_marker(entry):
    return any(f.get("name") == MARKER for f in entry.get("frames", ()))


def analyze(snapshot, phases=("forward", "backward", "optimizer", "after"), device=None):
    """Replay the trace. Returns a dict: peak (bytes above the pre-recording baseline), peak_index, n_events,
    phase (at the peak), live [(size, frames, phase)] at the peak, pre_freed (baseline bytes freed before the
    peak), reserved_delta (segment bytes added by the peak), and peak per phase."""
    trace = _trace(snapshot, device)

    def replay(stop):
        live, markers, cur, seg, pre_freed, k, phase = {}, set(), 0, 0, 0, 0, "before"
        best, best_i, per_phase = 0, -1, collections.defaultdict(int)
        for i, e in enumerate(trace[:stop]):
            a = e.get("action")
            if a == "alloc":
                if _is_marker(e):
                    phase = phases[k] if k < len(phases) else f"phase{k}"
                    k += 1
                    markers.add(e["addr"])
                    continue
                live[e["addr"]] = (e["size"], e.get("frames", []), phase)
                cur += e["size"]
                per_phase[phase] = max(per_phase[phase], cur)
                if cur > best:
                    best, best_i = cur, i
            elif a in ("free_completed", "free"):
                if e["addr"] in live:
                    cur -= live.pop(e["addr"])[0]
                elif e["addr"] in markers:
                    markers.discard(e["addr"])
                else:
                    cur -= e["size"]  # allocated before recording started
                    pre_freed += e["size"]
            elif a in ("segment_alloc", "segment_map"):
                seg += e["size"]
            elif a in ("segment_free", "segment_unmap"):
                seg -= e["size"]
        return dict(peak=best, peak_index=best_i, live=live, phase=phase, pre_freed=pre_freed, reserved_delta=seg,
                    per_phase=dict(per_phase))

    first = replay(len(trace))
    at_peak = replay(first["peak_index"] + 1) if first["peak_index"] >= 0 else first
    return dict(peak=first["peak"], peak_index=first["peak_index"], n_events=len(trace), phase=at_peak["phase"],
                live=list(at_peak["live"].values()), pre_freed=at_peak["pre_freed"],
                reserved_delta=at_peak["reserved_delta"], per_phase=first["per_phase"])


def report(snapshot, baseline=0, baseline_reserved=None, max_allocated=None, top=15, device=None):
    """Text: the peak, its phase, and the `top` allocation sites by bytes alive at the peak."""
    r = analyze(snapshot, device=device)
    lines = []
    if not r["n_events"]:
        return "memory snapshot: the trace is empty (was _record_memory_history on during the step?)"
    total = baseline - r["pre_freed"] + r["peak"]
    lines.append(f"memory snapshot: {r['n_events']} allocator events; peak allocated {_gib(total)} at event "
                 f"{r['peak_index']} (phase: {r['phase']}) = {_gib(baseline - r['pre_freed'])} alive from before the "
                 f"step (weights, optimizer state; {_gib(r['pre_freed'])} of it freed by then) + {_gib(r['peak'])} "
                 f"allocated during the step")
    if max_allocated is not None:
        lines.append(f"  torch.cuda.max_memory_allocated over the step: {_gib(max_allocated)}")
    if baseline_reserved is not None:
        lines.append(f"  reserved at the peak: {_gib(baseline_reserved + r['reserved_delta'])} "
                     f"(fragmentation/cache: {_gib(baseline_reserved + r['reserved_delta'] - total)})")
    if r["per_phase"]:
        lines.append("  highest step allocation per phase: " + ", ".join(f"{p} {_gib(v)}"
                                                                        for p, v in r["per_phase"].items()))
    groups = collections.defaultdict(lambda: [0, 0, collections.Counter(), collections.Counter()])
    for size, frames, phase in r["live"]:
        g = groups[site(frames)]
        g[0] += size
        g[1] += 1
        g[2][phase] += size
        g[3][size] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    lines.append(f"  top {min(top, len(ranked))} of {len(ranked)} allocation sites by bytes alive at the peak "
                 f"(bytes, blocks, phase that allocated them, commonest block size):")
    for label, (nbytes, count, by_phase, sizes) in ranked[:top]:
        share = 100.0 * nbytes / r["peak"] if r["peak"] else 0.0
        size, n = sizes.most_common(1)[0]
        phase = "/".join(p for p, _ in by_phase.most_common(2))
        lines.append(f"  {_gib(nbytes):>11} {share:5.1f}% {count:5d}x [{phase}] {n}x{_gib(size)}  {label}")
    rest = sum(g[0] for _, g in ranked[top:])
    if rest:
        lines.append(f"  {_gib(rest):>11} in the other {len(ranked) - top} sites")
    return "\n".join(lines)


# ---- the two diagnostics of bench_train ----------------------------------------------------------------

def profile_step(model, opt, ids, device, spec):
    """Host vs GPU time of one step and its kernel count, after the warm-up steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(max(spec["warmup"], 1)):
        bench_train.train_step(model, opt, ids)
    bench_train._sync(device)
    t0 = time.perf_counter()
    bench_train.train_step(model, opt, ids)
    t1 = time.perf_counter()
    bench_train._sync(device)
    t2 = time.perf_counter()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        bench_train.train_step(model, opt, ids)
        bench_train._sync(device)
    events = prof.events()
    # kernels and copies; record_function ranges projected onto the GPU (optimizer steps) are not work
    gpu = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    kernels = [e for e in gpu if not e.name.startswith(("Memcpy", "Memset"))]
    spans = sorted((e.time_range.start, e.time_range.end) for e in gpu)
    busy, end = 0.0, -math.inf
    for a, z in spans:  # union of the GPU intervals
        if z > end:
            busy += z - max(a, end)
            end = z
    launches = sum(1 for e in events if e.device_type == DeviceType.CPU and "LaunchKernel" in e.name)
    by_kernel = {}
    for e in kernels:
        t, c = by_kernel.get(e.name, (0.0, 0))
        by_kernel[e.name] = (t + e.time_range.elapsed_us(), c + 1)
    host = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)
    wall = 1e3 * (t2 - t0)
    what = f"{bench_train.STACKS[spec['stack']]} step, {spec['batch'][0]}x{spec['batch'][1]} tokens"
    lines = [f"profile of one {what}, dropout {spec['dropout']}: wall {wall:.1f} ms (no profiler), host "
             f"{1e3 * (t1 - t0):.1f} ms until Python returned (equal to wall when something in the step "
             f"synchronizes), GPU busy {busy / 1e3:.1f} ms (profiled: {100 * busy / 1e3 / wall:.0f}% of the "
             f"unprofiled wall), {len(kernels)} kernels, {len(gpu) - len(kernels)} memcpy/memset, {launches} "
             f"launch calls per step",
             "  top kernels by GPU time (ms, count):"]
    for name, (t, c) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:8]:
        lines.append(f"    {t / 1e3:8.2f} {c:5d}  {name[:110]}")
    lines.append("  top host ops by self CPU time (ms, calls):")
    for a in host[:10]:
        lines.append(f"    {a.self_cpu_time_total / 1e3:8.2f} {a.count:5d}  {a.key[:110]}")
    text = "\n".join(lines)
    print(text, flush=True)
    return {"status": "ok", "text": text, "kernels": len(kernels), "gpu_busy_ms": busy / 1e3, "wall_ms": wall,
            "host_ms": 1e3 * (t1 - t0)}


def snapshot_step(model, opt, ids, device, spec):
    """Allocator history of one step after the warm-up; dumps the pickle and prints the peak's allocation sites."""
    if device.type != "cuda":
        raise bench_train.Skipped("--memory-snapshot needs CUDA (the caching allocator's history)")
    for _ in range(max(spec["warmup"], 1)):
        bench_train.train_step(model, opt, ids)
    bench_train._sync(device)
    baseline, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    # context="alloc", not "all": with the stack of every free recorded too, a QLoRA step under non-reentrant
    # checkpointing died in the recompute with "SystemError: ... returned NULL without setting an exception"
    # (notes/cuda.md, round 8); the peak analysis reads the allocations' stacks only.
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="all", max_entries=2_000_000)
    try:
        bench_train.train_step(model, opt, ids, mark=lambda: bench_train._phase_marker(device))
        bench_train._sync(device)
        snap = slim(torch.cuda.memory._snapshot())
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    meta = {"baseline": baseline, "baseline_reserved": reserved,
            "max_allocated": torch.cuda.max_memory_allocated(device)}
    with open(spec["snapshot_file"], "wb") as f:
        pickle.dump(snap, f)
    with open(spec["snapshot_file"] + ".json", "w") as f:
        json.dump(meta, f)
    index = device.index if device.index is not None else torch.cuda.current_device()
    text = report(snap, top=15, device=index, **meta)
    print(f"memory snapshot of one {bench_train.STACKS[spec['stack']]} step written to {spec['snapshot_file']}\n"
          f"{text}", flush=True)
    return {"status": "ok", "text": text}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", help="a pickle from torch.cuda.memory._dump_snapshot or bench_train (which also "
                                     "writes SNAPSHOT.json with the baseline it measured)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--baseline", type=float, default=0.0, help="GiB allocated before recording started")
    args = ap.parse_args(argv)
    with open(args.snapshot, "rb") as f:
        snap = pickle.load(f)
    meta = {}
    if os.path.exists(args.snapshot + ".json"):  # bench_train's sidecar: the baseline it measured
        with open(args.snapshot + ".json") as f:
            meta = json.load(f)
    print(report(snap, baseline=meta.get("baseline", int(args.baseline * 2**30)),
                 baseline_reserved=meta.get("baseline_reserved"), max_allocated=meta.get("max_allocated"),
                 top=args.top))


if __name__ == "__main__":
    main()
