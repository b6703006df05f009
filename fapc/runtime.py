"""Where and how the FA network runs: the device (``auto``, ``cpu``, ``cuda[:N]``), its
arithmetic, its batches (micro-batches on a CPU, CUDA graphs on a GPU) and loading it.

Used by :mod:`fapc.normals` and by every command that runs a model (``fapc normals``,
``fapc train``, ``fapc bench``, validation).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fapc.errors import FapcError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) -> CUDA when available, else CPU; ``cpu``, ``cuda`` or ``cuda:N``.

    Raises ``ValueError`` for any other name, and ``FapcError`` for a CUDA device this machine
    does not have."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FapcError(f"--device {device} asked for, but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FapcError(f"--device {device} asked for, but this machine has "
                        f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


PRECISIONS = ("auto", "float32", "bf16")
CPU_MICRO_BATCH = 512  # queries per network call on a CPU (see fapc.fa_run)
CUDA_GRAPHS = True  # replay the network from CUDA graphs (fapc.cuda_graphs)
CUDA_BATCH = 1 << 18  # query points per batch on CUDA (patches, consensus)


def configure_precision(net: Any, device: torch.device, precision: str = "auto") -> None:
    """Set the model's arithmetic for ``device``: the network in float32 unless
    ``precision="bf16"`` (autocast on its widest product); the weighted fits in float64 on a
    CPU (about 20 % of the network's time there: float32 rounding can tip a robust pass at a
    nearly symmetric patch one way or the other), float32 on CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    net.use_bf16 = precision == "bf16"
    net.fit_dtype = torch.float64 if device.type == "cpu" else None


def run_network(model: Any, patches: torch.Tensor) -> dict[str, torch.Tensor]:
    """``model(patches)`` of a :class:`~fapc.models.normal_net.NormalNet` for ``patches
    (B, K, 3)``; on a CPU its network runs in micro-batches of :data:`CPU_MICRO_BATCH`
    queries, whose ``(b * F * K, width)`` activations stay in cache (about twice as fast as
    one pass over thousands of queries); on CUDA it is replayed from a CUDA graph
    (:mod:`fapc.cuda_graphs`, one launch per micro-batch instead of thousands) unless
    :data:`CUDA_GRAPHS` is off or capture fails."""
    if patches.device.type == "cuda" and CUDA_GRAPHS and not torch.is_grad_enabled():
        from fapc.cuda_graphs import graphed_forward

        graphed = graphed_forward(model, patches)
        if graphed is not None:
            return graphed(patches)
    if patches.device.type != "cpu" or len(patches) <= CPU_MICRO_BATCH:
        return model(patches)
    # micro-batch the network only: the weighted fits (many small ops) gain from long batches
    parts = [model.network(patches[m:m + CPU_MICRO_BATCH])
             for m in range(0, len(patches), CPU_MICRO_BATCH)]
    glob = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return model.fit(patches, torch.cat([p[0] for p in parts]), glob)


def default_batch_size(device: torch.device) -> int:
    """Query points per batch: 4096 keeps a CPU's activations in cache; a GPU needs long
    batches to be busy (:data:`CUDA_BATCH`; its network runs in graphed micro-batches)."""
    return CUDA_BATCH if device.type == "cuda" else 4096


def load_network(model: str | os.PathLike | Any | None, device: torch.device, *,
                 consensus_model: str | os.PathLike | None = None) -> Any:
    """The FA network ``model`` (a ``.safetensors`` file, a run directory, a loaded module, or
    None for the shipped one) in eval mode on ``device``; a ``consensus_model`` given is
    loaded too (and cached), so that a bad one is refused before any work.

    Raises:
        FapcError: a missing or refused file, or a consensus-step model given as the network.
    """
    if model is None or isinstance(model, (str, os.PathLike)):
        from fapc.models.checkpoint import cached_model

        net, _ = cached_model(None if model is None else os.fspath(model), str(device))
    else:
        net = model.to(device).eval()
    if getattr(net.config, "kind", None) == "consensus":
        raise FapcError("a consensus-step model, not a normal network (give it as the "
                        "consensus model: --consensus-model)",
                        path=model if isinstance(model, (str, os.PathLike)) else None)
    if consensus_model is not None:
        from fapc.consensus_batches import consensus_model as load_consensus

        load_consensus(device, consensus_model)
    return net
