"""The frozen MedSAM2 image encoder: the only module that touches sam2 and hydra.

MedSAM2 is the SAM 2.1 Hiera-tiny graph at 512 px; the PyPI sam2 ships the 1024 px file, so the
512 graph is that file plus three overrides (../shared/docs/medsam2.md). A "tiny" config of the
same classes keeps unit tests fast. Checkpoints use MedSAM2's layout, {"model": state_dict} with
encoder keys under "image_encoder.", and are loaded strictly: a silent partial load would give a
model that looks fine and knows nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.digests import file_digest

PREFIX = "image_encoder."
_BASE = "configs/sam2.1/sam2.1_hiera_t.yaml"


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    image_size: int
    overrides: tuple[str, ...]


SPECS: dict[str, EncoderSpec] = {
    # MedSAM2: SAM 2.1 Hiera-T at 512 px.
    "t512": EncoderSpec(
        "t512",
        512,
        (
            "++model.image_size=512",
            "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
            "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
        ),
    ),
    # Same classes, a fraction of the cost: for unit tests only.
    "tiny": EncoderSpec(
        "tiny",
        128,
        (
            "++model.image_size=128",
            "++model.image_encoder.trunk.embed_dim=16",
            "++model.image_encoder.trunk.stages=[1,1,2,1]",
            "++model.image_encoder.trunk.global_att_blocks=[3]",
            "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
            "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
            "++model.image_encoder.neck.d_model=32",
            "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
            "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
        ),
    ),
}


def build_encoder(name: str, seed: int = 0) -> nn.Module:
    """Instantiate the sam2 ImageEncoder for a named spec, on the CPU, in eval mode.

    Parameters are initialised from `seed` so that an encoder without a checkpoint is at least
    reproducible; the model card says when that is the case.
    """
    if name not in SPECS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(SPECS)}")
    import sam2  # noqa: F401  (initialises sam2's hydra config module)
    from hydra import compose
    from hydra.utils import instantiate

    cfg = compose(config_name=_BASE, overrides=list(SPECS[name].overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = instantiate(cfg.model.image_encoder, _recursive_=True)
    return encoder.eval().requires_grad_(False)


def encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under MedSAM2's key names."""
    return {PREFIX + k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}


def save_checkpoint(encoder: nn.Module, path: Path) -> str:
    """Write a MedSAM2-layout checkpoint ({"model": {...}}) and return its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": encoder_state(encoder)}, path)
    return file_digest(path)


def load_checkpoint(encoder: nn.Module, path: Path) -> str:
    """Load the encoder part of a MedSAM2 checkpoint strictly; return the file's sha256.

    Raises
    ------
    ValueError
        The file is not in MedSAM2 layout, or its encoder keys or shapes do not match the graph.
    """
    path = Path(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "model" not in blob:
        raise ValueError(f"{path}: not a MedSAM2 checkpoint (expected a dict with key 'model')")
    state = {k[len(PREFIX):]: v for k, v in blob["model"].items() if k.startswith(PREFIX)}
    if not state:
        raise ValueError(f"{path}: no '{PREFIX}*' tensors; is this a MedSAM2/SAM2 checkpoint?")
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: encoder weights do not fit the graph: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} with another shape (e.g. {wrong[:3]}); check the encoder config"
        )
    encoder.load_state_dict(state, strict=True)
    return file_digest(path)


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 autocast on CUDA (MedSAM2's inference precision) and float32 elsewhere;
    "bf16" also on the CPU (about 1.8x faster on AVX512-BF16 cores); "fp32" everywhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def place(encoder: nn.Module, device: torch.device) -> nn.Module:
    """The encoder on `device`, in the memory layout `forward` uses there (channels_last on CUDA)."""
    encoder = encoder.to(device)
    if torch.device(device).type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder


@torch.no_grad()
def forward(encoder: nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """The one encoder forward of the node and of training: vision_features (B, C, h, w) in float32.

    The predictor (live queries), the feature extractor (bundle training, the case index) and so
    every box a bundle or an index was fitted on go through this function, so the same image gives
    the same features on all three paths (tests/unit/test_models.py). `precision` is "bf16" or
    "fp32" (resolve_precision); `encoder` was placed on `device` by `place`.
    """
    device = torch.device(device)
    x = x.to(device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        vf = encoder(x)["vision_features"]
    return vf.float()
