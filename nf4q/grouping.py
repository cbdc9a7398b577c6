"""Sibling projections in one kernel launch: Linear4bit layers of one module that read the same input (q, k and v of
an attention; gate and up of an MLP) computed together when decoding (up to 64 rows, CUDA, no autograd).

The first member called computes every member's output with nf4q::gemm_4bit_group (one launch of the decode kernel,
up to 8 rows, or of the swapped wgmma kernel, 9-64 rows, instead of three; bit for bit the same outputs) and keeps
the others' outputs; a sibling called next with the same tensor (identity and version) takes its own. Anything else
(a sibling called with another input, or not called before the next computation, as in cross-attention) turns the
group off for good, so a group wastes at most one computation of its siblings' outputs. notes/cuda.md (rounds 11
and 12) has the measurements."""
import torch

from . import _ops

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without distributed
    DTensor = ()

# Child names whose modules read one input in the models of transformers (Llama, Mistral, Qwen, Gemma, Phi-3's MLP,
# BERT, Mixtral's experts before transformers 5). A group holds at most three (the kernel's limit).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))
MAX_ROWS = 64  # the grouped kernels' largest M (the swapped kernel's 64-token tile)
DEVICES = ("cuda",)  # where grouping pays (on CPU gemm_4bit_group is one gemm_4bit per weight; tests add "cpu")
_TABLES = ("weight_code", "weight_nested_code")


class ProjectionGroup:
    """2-3 Linear4bit layers of one in_features, block sizes and double quantization, computed in one call while
    decoding. Built by group_projections(); each member's forward asks it first (Linear4bit._projection_group)."""

    def __init__(self, members):
        self.members = tuple(members)
        self.enabled = True
        self._pending = {}  # member index -> (input, its _version, output): outputs computed for siblings
        self._checked = None  # the table parameters (and versions) last found equal in every member
        for i, m in enumerate(self.members):
            m._projection_group = (self, i)

    def output(self, i, x):
        """Member i's output for input x, or None when the member should compute it alone."""
        entry = self._pending.pop(i, None)
        if entry is not None:
            if entry[0] is x and entry[1] == x._version and not self._needs_autograd(x):
                return entry[2]
            self.disable()  # this sibling reads another input: grouping would compute its outputs twice
            return None
        if not self.enabled or not self._eligible(x):
            return None
        if self._pending:  # siblings skipped the outputs computed for them
            self.disable()
            return None
        if not self._tables_equal(x):
            return None
        ys = self._compute(x)
        self._pending = {j: (x, x._version, y) for j, y in enumerate(ys) if j != i}
        return ys[i]

    def disable(self):
        self.enabled = False
        self._pending = {}

    def _needs_autograd(self, x):
        """gemm_4bit_group has no autograd formula."""
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(b is not None and b.requires_grad
                                      for b in (m._parameters.get("bias") for m in self.members))

    # (Module attributes through _parameters and tensor ints: this runs on every decoding call, ~2 us in all.)
    def _eligible(self, x):
        if x.dim() == 0 or x.numel() > MAX_ROWS * x.shape[-1] or x.is_inference() or x.device.type not in DEVICES:
            return False  # (an inference tensor has no version counter to tell an in-place change)
        if self._needs_autograd(x):
            return False
        dtype, dev = self.members[0].compute_dtype, x.get_device()
        for m in self.members:
            w = m._parameters["weight"]
            if m.compute_dtype != dtype or isinstance(w, DTensor) or w.get_device() != dev:
                return False
        return True

    def _tables_equal(self, x):
        """Whether every member's code and nested-code tables equal the first one's (gemm_4bit_group uses its).
        Compared on the device once per change of the table parameters (never while a CUDA graph is captured)."""
        now = [(p, p._version) for m in self.members for p in (m._parameters[n] for n in _TABLES) if p is not None]
        if self._checked is not None and len(now) == len(self._checked) and all(
                a is b and va == vb for (a, va), (b, vb) in zip(now, self._checked)):
            return True
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        first = self.members[0]._parameters
        equal = all((m._parameters[n] is None) == (first[n] is None)
                    and (first[n] is None or torch.equal(m._parameters[n], first[n]))
                    for m in self.members[1:] for n in _TABLES)
        self._checked = now if equal else None
        if not equal:
            self.disable()
        return equal

    def _compute(self, x):
        dtype, _, xc = self.members[0]._bias_and_input(x)
        ys = _ops.gemm_4bit_group(xc, [m._w4() for m in self.members], [m._bias_in(dtype) for m in self.members])
        return [y if y.dtype == x.dtype else y.to(x.dtype) for y in ys]


def _kind(m):
    """What members of one group share (the kernel reads one x and decodes one way)."""
    return m.in_features, m.blocksize, m.nested_blocksize, m.weight_nested_absmax is None


def group_projections(model: torch.nn.Module, siblings=SIBLINGS) -> int:
    """Group the sibling Linear4bit layers of `model` (children of one module named as one entry of `siblings`,
    2-3 of them) so that decoding computes each group in one kernel launch; returns the number of groups.
    quantize_model, from_pretrained and load_quantized call it. Earlier groups in `model` are dropped first, so
    `siblings=()` ungroups."""
    from .linear import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit):
            m._projection_group = None
    count = 0
    for parent in model.modules():
        for names in siblings:
            kinds = {}
            for m in (parent._modules.get(n) for n in names):
                if isinstance(m, Linear4bit):
                    kinds.setdefault(_kind(m), []).append(m)
            for members in kinds.values():
                if 2 <= len(members) <= 3:
                    ProjectionGroup(members)
                    count += 1
    return count
