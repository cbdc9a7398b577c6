"""torch.library.opcheck on every op: schema, fake kernel, autograd registration and dispatch agree."""
import pytest
import torch

import nf4q
from nf4q import _ops

ops = torch.ops.nf4q


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck_all_ops(device, double_quant):
    torch.manual_seed(0)
    qw = nf4q.quantize(torch.randn(48, 96, device=device), double_quant=double_quant)
    w4 = qw.op_args()
    x = torch.randn(5, 96, device=device, requires_grad=True)
    g = torch.randn(5, 48, device=device)
    bias = torch.randn(48, device=device, requires_grad=True)
    A = torch.randn(4, 96, device=device, requires_grad=True)
    B = torch.randn(48, 4, device=device, requires_grad=True)
    code, dyn = nf4q.nf4_code(device), nf4q.dynamic_map(device)
    cases = [
        (ops.quantize_4bit, (torch.randn(1000, device=device), code, 64)),
        (ops.dequantize_4bit.default, (*w4, torch.float32)),
        (ops.quantize_blockwise_8bit, (torch.randn(1000, device=device), dyn, 256)),
        (ops.dequantize_blockwise_8bit, (*_ops.quantize_blockwise_8bit(torch.randn(1000, device=device), dyn, 256),
                                         dyn, 256, torch.float32)),
        (ops.gemm_4bit, (x, *w4, bias)),
        (ops.gemm_4bit, (x, *w4, None)),
        (ops.gemm_4bit_dx, (g, *w4)),
        (ops.lora_gemm_4bit, (x, *w4, bias, A, B, 0.5)),
        (ops.lora_gemm_4bit, (x, *w4, None, A, B, 0.5, 0.25, 1234)),  # with LoRA dropout
        # backward pieces: no double backward
        (ops.lora_gemm_4bit_dx, (g, *w4, A.detach(), B.detach(), 0.5)),
        (ops.lora_gemm_4bit_dx, (g, *w4, A.detach(), B.detach(), 0.5, 0.25, 1234)),
        (ops.lora_gemm_4bit_backward, (g, x.detach(), *w4, A.detach(), B.detach(), 0.5, 0.25, 1234,
                                       [True, True, True])),
        (ops.lora_gemm_4bit_backward, (g, x.detach(), *w4, A.detach(), B.detach(), 0.5, 0.0, 0,
                                       [False, True, False])),
        (ops.lora_dropout, (x.detach(), 0.3, 99)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    out = torch.empty(48, 96, device=device)
    torch.library.opcheck(ops.dequantize_4bit.out, w4 + (torch.float32,), {"out": out})
