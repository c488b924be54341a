"""int8 weights for inference (``tinygpt sample/chat --quantize int8``), through torchao.

:func:`quantize_int8` replaces the weight of every ``nn.Linear`` of a GPT (attention and MLP
projections, and the output head) with torchao's int8 tensor subclass: symmetric per-output-channel
int8 weights with one float scale a row, activations kept in float (``Int8WeightOnlyConfig``).
Decoding at small batch reads every weight once per token, so 4x fewer weight bytes is what makes
it faster; benchmarks/int8_decode.py measures tokens/s and perplexity against fp32 in one run.
The token embedding stays float (it is a lookup, not a matmul): with tied embeddings the output
head gets its own int8 copy and the embedding keeps the float matrix.

This is torchao's well-kept path (``torch.ao.quantization.quantize_dynamic`` is deprecated in favour
of it); tinygpt writes no kernels. It knows the model only as a module tree: nothing about
tokenizers, checkpoints or sampling. The server and the exporters call the same function.
"""

from __future__ import annotations

import logging

from torch import nn

MODES = ("none", "int8")


def _torchao():
    # torchao logs a line per optional CUDA/cutlass extension it cannot load on a CPU-only torch
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise ImportError("--quantize int8 needs torchao: pip install 'tinygpt[int8]' (or pip install torchao)") from e
    return tq


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize ``model``'s Linear weights to int8 in place (inference only) and return it.

    The scalar head of a reward/value model (one output) stays float: it is tiny and its single
    output row would get one scale for everything."""
    tq = _torchao()
    model.eval()  # an int8 model is for inference only

    def is_target(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and not fqn.endswith("scalar_head")

    # untie first, so the embedding lookup keeps its float matrix and only the head's copy is quantized
    head = getattr(model, "lm_head", None)
    emb = getattr(model, "tok_emb", None)
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    for p in model.parameters():
        p.requires_grad_(False)
    tq.quantize_(model, tq.Int8WeightOnlyConfig(), filter_fn=is_target)
    model.quantized = "int8"
    return model


def apply(model: nn.Module, mode: str) -> nn.Module:
    """``mode`` "none" returns the model unchanged; "int8" quantizes it (see :func:`quantize_int8`)."""
    if mode not in MODES:
        raise ValueError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")
    return model if mode == "none" else quantize_int8(model)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (an int8 tensor counts its int8 data and scales)."""
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        inner = [getattr(t, name) for name in getattr(t, "tensor_data_names", ())] if hasattr(t, "tensor_data_names") else []
        total += sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()
    return total

