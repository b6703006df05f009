"""The patch network's forward pass replayed from a CUDA graph.

The forward pass (frames, the 3x3 Jacobi eigensolver, the network, the robust weighted fits)
is thousands of small kernels; on a GPU their launch cost, not their arithmetic, sets the
time. A CUDA graph records them once for a fixed micro-batch of :data:`GRAPH_BATCH` patches
and replays them with one launch. Shorter batches are padded with copies of their first patch
(rows are independent, so padding changes no result). Results equal eager ones (same kernels).

Capture needs a forward pass free of host synchronisation; should it fail (another model
class, an old driver), :func:`graphed_forward` returns None once for that model and the caller
stays eager.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# patches per replay: ~7 GB of activations for the shipped model. Shorter replays cost more:
# each of the thousands of small kernels has a floor of a few microseconds (measured on an
# H200: 2^15 patches per replay took 0.33 s per million points, eager 2^18 batches 0.24 s).
GRAPH_BATCH = 1 << 17


class GraphedForward:
    """``model(patches)`` for ``patches (B, K, 3)`` on CUDA, replayed in micro-batches."""

    def __init__(self, model: Any, *, size: int, dtype: torch.dtype, device: torch.device,
                 batch: int = GRAPH_BATCH) -> None:
        self.batch = batch
        self.static_in = torch.zeros(batch, size, 3, dtype=dtype, device=device)  # (b, K, 3)
        # a plausible patch (points on a tilted plane) so that warm-up and capture run real maths
        grid = torch.linspace(-1, 1, size, device=device, dtype=dtype)
        self.static_in[:, :, 0] = grid
        self.static_in[:, :, 1] = grid.flip(0) * 0.5
        self.static_in[:, :, 2] = 0.1 * grid.square()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: cuBLAS handles, allocator pools
            for _ in range(2):
                model(self.static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out: dict[str, torch.Tensor] = model(self.static_in)

    def __call__(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """``patches (B, K, 3)`` -> the model's outputs (fresh tensors, ``(B, ...)``)."""
        parts: list[dict[str, torch.Tensor]] = []
        for s in range(0, len(patches), self.batch):
            part = patches[s:s + self.batch]
            b = len(part)
            self.static_in[:b].copy_(part)
            if b < self.batch:
                self.static_in[b:].copy_(part[:1].expand(self.batch - b, -1, -1))
            self.graph.replay()
            parts.append({key: v[:b].clone() for key, v in self.static_out.items()})
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def graphed_forward(model: Any, patches: torch.Tensor) -> GraphedForward | None:
    """The model's graphed forward for patches like ``patches (B, K, 3)`` (built once per
    model, size, dtype and precision; kept on the model), or None where capture failed."""
    key = (patches.shape[1], patches.dtype, patches.device, getattr(model, "use_bf16", False),
           getattr(model, "fit_dtype", None))
    cache: dict = model.__dict__.setdefault("_cuda_graphs", {})
    if key not in cache:
        try:
            cache[key] = GraphedForward(model, size=patches.shape[1], dtype=patches.dtype,
                                        device=patches.device)
        except Exception as exc:  # capture is an optimisation: fall back to eager launches
            log.warning("CUDA graph capture failed (%s: %s); running the network eagerly",
                        type(exc).__name__, exc)
            torch.cuda.synchronize(patches.device)
            cache[key] = None
    return cache[key]
