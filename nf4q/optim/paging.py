"""The page manager of paged optimizer states: CUDA managed memory under a GPU byte budget.

Every parameter's states live in one managed allocation. Without a budget they live on the GPU and the
driver may page them out under memory pressure (and back in on use). With a budget (`gpu_budget_bytes`)
their home is the host, and this class moves "entries": a parameter's states, or 256-aligned element
ranges of them when one parameter's states exceed a quarter of the budget. A step walks the entries in
chunks of at most half the budget and, while the kernel of chunk i runs on the compute stream, prefetches
chunk i+1 to the GPU on a copy stream after evicting least-recently-used entries to the host
(cudaMemPrefetchAsync to the CPU).
Events order the two streams: a chunk's kernel waits for its prefetch, an eviction waits for the last
kernel that used the entry. Nothing synchronizes the host. The walk alternates direction every step, so
the entries still resident from the end of one step are the first ones the next step needs.

`resident_bytes` is this accounting (what was prefetched to the GPU and not evicted since); it never
exceeds the budget, and `peak_resident_bytes` records its maximum. Managed memory is freed with the last
tensor that views it (the optimizer's state), not by this class: entries hold weak references.
"""
import weakref
from collections import OrderedDict

import torch

from . import _kernels as K

ALIGN = 256  # byte alignment of each state inside an allocation
QBLOCK = 256  # elements per 8-bit absmax block: entry ranges start on multiples of it


class PagedMemoryError(RuntimeError):
    """More managed memory was asked for than the GPU has free."""


class _Entry:
    """The states of one parameter, or of an element range [lo, hi) of one (its 256-aligned slice of every
    state: tensors of n elements are sliced by element, absmax tensors by block)."""
    __slots__ = ("refs", "lo", "hi", "n", "nbytes", "resident", "used")

    def __init__(self, tensors, lo, hi, n, resident):
        self.refs = [weakref.ref(t) for t in tensors]
        hi = None if (lo == 0 and hi == n) else hi  # the whole tensors: no slicing
        self.lo, self.hi, self.n, self.resident, self.used = lo, hi, n, resident, None
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self):
        out = []
        for ref in self.refs:
            t = ref()
            if t is None:
                continue
            if self.hi is not None:
                t = t.view(-1)
                if t.numel() == self.n:  # an element-wise state
                    t = t[self.lo:self.hi]
                else:  # a per-block absmax
                    t = t[self.lo // QBLOCK: -(-self.hi // QBLOCK)]
            out.append(t)
        return out


class PageManager:
    _all = weakref.WeakSet()  # every live manager, for the process-wide resident total

    def __init__(self, device, budget_bytes=None):
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.budget = budget_bytes
        self._entries = OrderedDict()  # key -> _Entry, least recently used first
        self._stream = None
        self._reverse = False
        self.resident_bytes = self.peak_resident_bytes = 0
        self.bytes_to_device = self.bytes_to_host = 0
        PageManager._all.add(self)

    # ---- allocation ---------------------------------------------------------------------------------

    def allocate(self, specs):
        """Zeroed managed tensors for `specs` [(name, shape, dtype)], in one allocation; returns {name: tensor}.
        With a budget their home is the host (not resident), else the GPU."""
        offsets, total = [], 0
        for _, shape, dtype in specs:
            offsets.append(total)
            total += -(-_nbytes(shape, dtype) // ALIGN) * ALIGN
        self._check_free(total)
        slab = K.managed_zeros(total, self.device, self.budget is not None)
        return {name: slab[off:off + _nbytes(shape, dtype)].view(dtype).view(shape)
                for (name, shape, dtype), off in zip(specs, offsets)}

    def register(self, key, tensors, lo=0, hi=None, n=None):
        """Track the states `tensors` of a parameter of n elements (or their [lo, hi) element range) as one
        entry of the budget."""
        self.forget(key)
        e = _Entry(tensors, lo, hi, n, resident=self.budget is None)
        self._entries[key] = e
        if e.resident:
            self._count_in(e.nbytes)

    def _check_free(self, nbytes):
        free, _ = torch.cuda.mem_get_info(self.device)
        resident = sum(m.resident_bytes for m in list(PageManager._all) if m.device == self.device)
        away = max(K.managed_stats()[0] - resident, 0)  # our managed bytes not on the GPU now
        budget = f"gpu_budget_bytes={self.budget}"
        if self.budget is not None and self.budget > free + resident:
            raise ValueError(f"{budget} is more than the {free + resident} bytes of GPU memory free for paged "
                             "states; lower gpu_budget_bytes")
        if away + nbytes > free:
            raise PagedMemoryError(
                f"nf4q.optim: paged states need {nbytes} more bytes of managed memory ({away} already live off the "
                f"GPU) but the GPU has {free} bytes free; nf4q never allocates more managed memory than the GPU has "
                f"free. {budget} only limits how much of it stays resident: free GPU memory, use bits=8, or "
                "paged=False.")

    def forget(self, key=None):
        """Drop one entry from the accounting (or all, key None); the memory goes with its tensors."""
        keys = list(self._entries) if key is None else [key] if key in self._entries else []
        for k in keys:
            e = self._entries.pop(k)
            if e.resident:
                self.resident_bytes -= e.nbytes

    # ---- a step -------------------------------------------------------------------------------------

    def run(self, work, launch):
        """work: [(key, payload)] in parameter order; launch(payloads) updates them on the current stream."""
        self._drop_dead()
        if self.budget is None or sum(self._entries[k].nbytes for k, _ in work) <= self.budget:
            ready = self._bring_in(work)
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
            launch([payload for _, payload in work])
            if self.budget is not None:
                self._mark_used(work)
            return
        if self._reverse:
            work = work[::-1]
        self._reverse = not self._reverse
        chunks = self._chunks(work)
        compute = torch.cuda.current_stream(self.device)
        ready = self._bring_in(chunks[0])
        for i, chunk in enumerate(chunks):
            if ready is not None:
                compute.wait_event(ready)
            launch([payload for _, payload in chunk])
            self._mark_used(chunk)
            if i + 1 < len(chunks):
                ready = self._bring_in(chunks[i + 1])

    def _chunks(self, work):
        half = max(self.budget // 2, 1)
        chunks, cur, cur_bytes = [], [], 0
        for key, payload in work:
            nbytes = self._entries[key].nbytes
            if nbytes > self.budget:
                raise ValueError(f"gpu_budget_bytes={self.budget} is smaller than the states of one parameter "
                                 f"({nbytes} bytes); raise gpu_budget_bytes")
            if cur and cur_bytes + nbytes > half:
                chunks.append(cur)
                cur, cur_bytes = [], 0
            cur.append((key, payload))
            cur_bytes += nbytes
        return chunks + [cur] if cur else chunks

    def _bring_in(self, chunk):
        """Prefetch a chunk's non-resident entries on the copy stream; returns the event to wait on, or None."""
        keys = {k for k, _ in chunk}
        need = [self._entries[k] for k in keys if not self._entries[k].resident]
        if not need:
            return None
        nbytes = sum(e.nbytes for e in need)
        stream = self._copy_stream()
        with torch.cuda.stream(stream):
            if self.budget is not None:
                self._evict_for(nbytes, keep=keys)
            K.prefetch([t for e in need for t in e.tensors()], self.device.index)
            for e in need:
                e.resident = True
            self._count_in(nbytes)
            ready = torch.cuda.Event()
            ready.record(stream)
        return ready

    def _evict_for(self, nbytes, keep):
        """Evict least-recently-used entries (not in keep) to the host until nbytes more fit the budget."""
        stream = torch.cuda.current_stream(self.device)
        for k, e in list(self._entries.items()):
            if self.resident_bytes + nbytes <= self.budget:
                break
            if k in keep or not e.resident:
                continue
            if e.used is not None:
                stream.wait_event(e.used)  # the last kernel that touched it must be done
            K.prefetch(e.tensors(), -1)
            e.resident = False
            self.resident_bytes -= e.nbytes
            self.bytes_to_host += e.nbytes
        if self.resident_bytes + nbytes > self.budget:
            raise ValueError(f"gpu_budget_bytes={self.budget} cannot hold {nbytes} bytes of states at once; "
                             "raise gpu_budget_bytes")

    def _mark_used(self, chunk):
        used = torch.cuda.Event()
        used.record(torch.cuda.current_stream(self.device))
        for key, _ in chunk:
            self._entries[key].used = used
            self._entries.move_to_end(key)

    def _count_in(self, nbytes):
        self.resident_bytes += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        if self.budget is not None:
            self.bytes_to_device += nbytes
            assert self.resident_bytes <= self.budget, "nf4q.optim: page manager accounting exceeded the budget"

    def _drop_dead(self):
        for k in [k for k, e in self._entries.items() if not e.tensors()]:
            self.forget(k)

    def _copy_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream


def _nbytes(shape, dtype):
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()
