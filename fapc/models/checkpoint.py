"""Model files: safetensors weights with the config, fapc version and metrics as metadata.

Loading never unpickles: anything that is not a safetensors file (a pickled ``.pt``, a zip
archive, a renamed file) is refused before any of its bytes are interpreted as code.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from fapc.errors import FapcError
from fapc.models.normal_net import NormalNet, NormalNetConfig

FORMAT = "fapc-normalnet-1"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "default.safetensors"
# the learned consensus step (fapc.models.consensus_net), used by default after the network
CONSENSUS_MODEL = DEFAULT_MODEL.with_name("consensus.safetensors")
# its weights for clouds whose noise figure reads heavy (fapc.near_scale.smoother_for_figure),
# used there instead where the package holds them
HEAVY_CONSENSUS_MODEL = DEFAULT_MODEL.with_name("consensus_heavy.safetensors")


def save_model(path: str | os.PathLike, model: torch.nn.Module, *,
               metrics: dict[str, Any] | None = None) -> None:
    """Write ``model`` as safetensors (atomically) with its config and metrics."""
    from safetensors.torch import save_file

    from fapc import __version__

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.config.to_json(), "fapc_version": __version__,
            "metrics": json.dumps(metrics or {})}
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """A ``.safetensors`` file, or a run directory holding ``best.safetensors``."""
    if path is None:
        return DEFAULT_MODEL
    p = Path(path)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / name).exists():
                return p / name
        raise FapcError("directory holds no best.safetensors or last.safetensors", path=p)
    return p


def _check_safetensors(p: Path) -> None:
    try:
        with open(p, "rb") as f:
            head = f.read(9)
            size = p.stat().st_size
    except OSError as e:
        raise FapcError(f"cannot read model ({e.strerror})", path=p) from None
    if len(head) < 9:
        raise FapcError("not a safetensors model file (too short)", path=p)
    (n,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or n > min(size - 8, 100 << 20):
        kind = "a pickle" if head[:1] == b"\x80" else "a zip archive (torch.save)" \
            if head[:2] == b"PK" else "an unknown file"
        raise FapcError(f"not a safetensors model file ({kind}); only .safetensors models are "
                        "loaded, pickled checkpoints are refused", path=p)


def load_model(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu"
               ) -> tuple[Any, dict[str, Any]]:
    """Load a model file (default: the shipped model). Returns the model (eval mode) and its
    metadata (``config``, ``fapc_version``, ``metrics``)."""
    from safetensors import safe_open

    p = resolve_model_path(path)
    if not p.exists():
        raise FapcError("no such model file", path=p)
    if p.suffix != ".safetensors":
        raise FapcError("model files must be .safetensors (pickled checkpoints are refused)",
                        path=p)
    _check_safetensors(p)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # corrupt header or data
        raise FapcError(f"corrupt model file ({e})".splitlines()[0], path=p) from None
    if meta.get("format") != FORMAT:
        raise FapcError(f"not a fapc model (format {meta.get('format')!r})", path=p)
    kind = json.loads(meta["config"]).get("kind")
    if kind == "shape":
        from fapc.models.shape_net import ShapeNetConfig, ShapeNormalNet

        config: Any = ShapeNetConfig.from_json(meta["config"])
        model: Any = ShapeNormalNet(config)
    elif kind == "consensus":
        from fapc.models.consensus_net import ConsensusNet, ConsensusNetConfig

        config = ConsensusNetConfig.from_json(meta["config"])
        model = ConsensusNet(config)
    else:
        config = NormalNetConfig.from_json(meta["config"])
        model = NormalNet(config)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise FapcError(f"model weights do not match its config ({e})".splitlines()[0],
                        path=p) from None
    info = {"config": config, "fapc_version": meta.get("fapc_version"),
            "metrics": json.loads(meta.get("metrics", "{}")), "path": str(p)}
    return model.to(device).eval(), info


@functools.lru_cache(maxsize=4)
def cached_model(path: str | None, device: str) -> tuple[torch.nn.Module, dict]:
    """:func:`load_model`, kept for reuse: a batch of files loads each model once per device
    (the same model objects come back, so callers must not change them)."""
    return load_model(path, device=device)
