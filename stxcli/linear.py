"""The fully-connected product that ``stx predict`` runs most: float32 on the CPU through oneDNN
where this torch has it, else :func:`torch.nn.functional.linear`.

Why: predict's time is the first layer (a few thousand features -> a few hundred outputs). On
the AMD EPYC machines of CI and the benchmarks, torch's default product for it (MKL's sgemm)
took 79-80 ms for 4,096 x 3,500 -> 544 on 2 threads, and oneDNN's kernel
(``torch.ops.mkldnn._linear_pointwise``, the one torch's own compiler emits for CPU linear
layers) 71-74 ms. The results agree to float32 rounding, not bit for bit (another summation
order). The op is private to torch, so it is taken only after it has run once here and matched
``F.linear`` on a probe; anything else (no oneDNN, a changed signature, a mismatch, another
device or dtype) takes ``F.linear``. ``STX_ONEDNN=0`` turns it off (for comparisons).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor], torch.Tensor]


@lru_cache(maxsize=1)
def onednn_usable() -> bool:
    """Whether oneDNN's float32 linear kernel runs here and agrees with ``F.linear`` on a probe."""
    if os.environ.get("STX_ONEDNN", "1").strip() == "0" or not torch.backends.mkldnn.is_available():
        return False
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((8, 40), (24, 40), (24,)))
    try:
        with torch.no_grad():
            got = op(x, w, b, "none", [], "")
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(got.shape == (8, 24) and torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5))


def linear_fn(weight: torch.Tensor, bias: torch.Tensor) -> Linear:
    """``x -> x @ weight.T + bias`` for inference (no autograd), through oneDNN where usable."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_usable():
        op = torch.ops.mkldnn._linear_pointwise
        w, b = weight.detach().contiguous(), bias.detach().contiguous()

        def fast(x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.float32 or x.device.type != "cpu":
                return F.linear(x, w, b)
            return op(x.contiguous(), w, b, "none", [], "")

        return fast
    return lambda x: F.linear(x, weight, bias)
