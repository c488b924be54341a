"""int8 weights for CPU inference (``tinygpt sample/chat --quantize int8``), through PyTorch's own kernels.

:func:`quantize_int8` turns every ``nn.Linear`` of a GPT (attention and MLP projections and the
output head) into a dynamically quantized int8 Linear: weights int8 per output channel with one
float scale a row, activations quantized to int8 on the fly per call, the matmul run by PyTorch's
x86 int8 GEMM (fbgemm / oneDNN) and the result returned in float. The token embedding stays float
(a lookup, not a matmul); with tied embeddings the head gets its own int8 copy.

Two well-kept paths, no hand-written kernels:

    backend="torch"    torch.ao.quantization.quantize_dynamic with per-channel weights (the default):
                       real int8 matmuls in eager mode. PyTorch has marked it for migration to torchao
                       (it warns so), but it is the path with eager CPU int8 kernels today.
    backend="torchao"  torchao's Int8WeightOnlyConfig: int8 storage, dequantized to float for the
                       matmul. It saves memory; on a CPU without torch.compile it decodes slower.

benchmarks/int8_decode.py measures both against fp32 (tokens/s, perplexity) in one run.

It knows the model only as a module tree: nothing about tokenizers, checkpoints or sampling. The
server and other callers use :func:`quantize_int8` or :func:`apply`.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

MODES = ("none", "int8")
HELP = ("none, or int8: int8 weights (tinygpt.quantize), 2.7x smaller; on the AVX2 test host decoding was "
        "not faster than float32 (benchmarks/int8_decode.py)")
BACKENDS = ("torch", "torchao")


def _is_target(module: nn.Module, fqn: str) -> bool:
    """Every Linear except a reward/value model's scalar head (one output row: tiny, and one scale for all)."""
    return isinstance(module, nn.Linear) and not fqn.endswith("scalar_head")


def quantize_int8(model: nn.Module, backend: str = "torch") -> nn.Module:
    """Quantize ``model``'s Linear layers to int8 for inference and return it (changed in place)."""
    if backend not in BACKENDS:
        raise ValueError(f"int8 backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    targets = {name for name, m in model.named_modules() if _is_target(m, name)}
    if backend == "torch":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # the migration notice, once per Linear
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning, FutureWarning))
            quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in targets}, dtype=torch.qint8,
                             inplace=True)
    else:
        logging.getLogger("torchao").setLevel(logging.ERROR)  # one line per CUDA extension it cannot load
        try:
            import torchao.quantization as tq
        except ImportError as e:
            raise ImportError("the torchao int8 backend needs torchao: pip install 'tinygpt[int8]'") from e
        head, emb = getattr(model, "lm_head", None), getattr(model, "tok_emb", None)
        if head is not None and emb is not None and head.weight is emb.weight:  # untie: the lookup stays float
            head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        tq.quantize_(model, tq.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in targets)
    model.quantized = f"int8 ({backend})"
    return model


def apply(model: nn.Module, mode: str) -> nn.Module:
    """``mode`` "none" returns the model unchanged; "int8" quantizes it (see :func:`quantize_int8`)."""
    if mode not in MODES:
        raise ValueError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")
    return model if mode == "none" else quantize_int8(model)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: float parameters and buffers, int8 data plus scales of quantized layers."""
    total, seen = 0, set()
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and callable(getattr(module, "weight", None)):  # torch's dynamic int8 Linear
            w = module.weight()
            scales = w.q_per_channel_scales().numel() if w.qscheme() in (torch.per_channel_affine,
                                                                          torch.per_channel_symmetric) else 1
            total += w.numel() + scales * 12  # int8 values; a float64 scale and an int32 zero point a row
            bias = module.bias()
            total += bias.numel() * bias.element_size() if bias is not None else 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        names = getattr(t, "tensor_data_names", None)  # a torchao tensor: its int8 data and scales
        inner = [getattr(t, n) for n in names] if names else [t]
        total += sum(x.numel() * x.element_size() for x in inner)
    return total
