"""Whole-volume dose prediction from checkpoints: sliding window with Gaussian blending
(common.sliding_window), left-right flip test-time augmentation, models trained on a coarser grid
(``input.grid_factor``: output upsampled trilinearly, see :meth:`EnsemblePredictor._to_case_grid`),
checkpoint ensembles (mean and voxel-wise spread, common.ensembling), diffusion sampling with several samples.

A checkpoint rebuilds its model alone (common.checkpoint.load_model) and carries the input spec and the
training patch size in ``preprocessing``; EMA weights, when training kept them, are in ``extra.ema``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.checkpoint import CheckpointError, apply_ema_weights, load_model, resolve_checkpoints
from common.runfolder import config_differences
from common.sliding_window import sliding_window_inference
from vmat.data import build_inputs, coarsen, cond_permutation, input_channel_permutation

INFERENCE_DEFAULTS = {
    "window_zyx": None,  # sliding-window size; null = the training patch size
    "overlap": 0.5,  # fraction of the window shared by neighbours
    "blend": "gaussian",  # gaussian | constant
    "batch_size": 2,  # windows per forward pass
    "tta_flip": True,  # average with the left-right flipped prediction (channels swapped)
    "use_ema": True,  # EMA weights when the checkpoint has them
    "clamp_max_rx": 1.5,  # predicted dose clamped to [0, 1.5] x Rx (notes: inference)
    "diffusion_samples": 4,  # diffusion models: samples per case (mean = prediction, std = spread)
    "diffusion_steps": 10,  # DDIM steps (few steps work once the dose is scaled to [-1, 1])
    "channels_last": True,  # channels_last_3d windows (much faster Conv3d on CPU)
}


def load_member(path: str | Path, device, use_ema: bool = True):
    model, ckpt = load_model(path, device=device, expected_domain="vmat")
    if use_ema:
        apply_ema_weights(model, ckpt)
    prep = ckpt.get("preprocessing") or {}
    if "input_spec" not in prep:
        raise CheckpointError(f"{path}: field 'preprocessing.input_spec' is missing (not a vmat dose model?)")
    return model.eval(), prep


def add_checkpoint_argument(parser, required: bool = False, group=None) -> None:
    """``--checkpoint PATH [PATH ...]``: files, run folders or ensemble folders (one ensemble in all)."""
    (group or parser).add_argument("--checkpoint", type=Path, nargs="+", required=required, metavar="PATH",
                                   help="checkpoint file(s), run folder(s) or ensemble folder(s); several = ensemble")


def checkpoint_files(paths: list[Path]) -> list[Path]:
    """Every checkpoint file the ``--checkpoint`` paths name, in order (common.checkpoint.resolve_checkpoints)."""
    return [file for path in paths for file in resolve_checkpoints(path)]


class EnsemblePredictor:
    """Predict dose (Gy) for case dicts with one or several checkpoints."""

    def __init__(self, checkpoints: Sequence[str | Path] = (), cfg: Mapping = INFERENCE_DEFAULTS, device="cpu",
                 members: Sequence[tuple] | None = None):
        """``checkpoints``: files or run folders; or ``members``: [(model, preprocessing dict)] already built
        (training's whole-volume validation uses the live model this way)."""
        self.cfg = {**INFERENCE_DEFAULTS, **dict(cfg)}
        self.device = torch.device(device)
        if members is None:
            if not checkpoints:
                raise ValueError("no checkpoints given")
            members = [load_member(p, self.device, self.cfg["use_ema"]) for p in checkpoints]
        if self.cfg["channels_last"]:
            members = [(m.to(memory_format=torch.channels_last_3d), prep) for m, prep in members]
        self.members = list(members)
        specs = [m[1]["input_spec"] for m in self.members]
        differing = sorted({dotted.split(".")[0] for s in specs[1:] for dotted, _, _ in config_differences(specs[0], s)})
        if differing:
            why = (" (each run fits its own mean-dose atlas on its training patients: an atlas-input ensemble "
                   "needs members trained on the same patients)" if "atlas" in differing else "")
            raise CheckpointError(f"ensemble members were trained with different input specs, differing in "
                                  f"{differing}{why}: combine only checkpoints trained on the same preprocessing")
        self.spec = specs[0]
        self.channel_perm = input_channel_permutation(self.spec)
        self.cond_perm = cond_permutation(self.spec)

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.cfg["channels_last"] else x

    def _window(self, prep: Mapping, model) -> list[int]:
        window = self.cfg["window_zyx"] or prep.get("patch_size")
        factor = 2 ** getattr(model, "n_pool", 0)
        return [max(factor, int(w) // factor * factor) for w in window]

    def _member_outputs(self, model, prep, image: torch.Tensor, cond: torch.Tensor, seed: int) -> list[torch.Tensor]:
        """Dose / Rx volumes of one member: 1 (or 2 with TTA) for regressors, n samples for diffusion."""
        window = self._window(prep, model)
        outputs = []
        views = [(image, cond, False)]
        if self.cfg["tta_flip"]:
            views.append((image[:, self.channel_perm].flip(-1), cond[:, self.cond_perm], True))
        for view_image, view_cond, flipped in views:
            if getattr(model, "is_diffusion", False):
                generator = torch.Generator().manual_seed(seed)

                def predictor(x, _c=view_cond, _g=generator):
                    c = _c.expand(x.shape[0], -1)
                    return model.sample(self._format(x), c, n_samples=int(self.cfg["diffusion_samples"]),
                                        steps=int(self.cfg["diffusion_steps"]), generator=_g).transpose(0, 1).flatten(1, 2)

            else:
                def predictor(x, _c=view_cond):
                    return model(self._format(x), _c.expand(x.shape[0], -1))
            out = sliding_window_inference(view_image, window, predictor, overlap=float(self.cfg["overlap"]),
                                           mode=self.cfg["blend"], batch_size=int(self.cfg["batch_size"]),
                                           output_device="cpu")
            if flipped:
                out = out.flip(-1)
            outputs += [out[:, i:i + 1] for i in range(out.shape[1])]
        return outputs

    def _to_case_grid(self, outputs: list[torch.Tensor], image_np: np.ndarray, factor: int, residual: bool):
        """Coarse-grid outputs (``input.grid_factor``) → the case grid: trilinear upsampling (coarse voxel
        centres at the centres of their blocks, as :func:`vmat.data.coarsen` averages them). For a model
        predicting the residual over the atlas (last input channel) only the correction is upsampled and
        added to the full-resolution atlas, so the target edges of the atlas stay sharp."""
        shape = image_np.shape[1:]
        atlas_coarse = torch.from_numpy(coarsen(image_np[-1:], factor))[None] if residual else None
        atlas_full = torch.from_numpy(np.ascontiguousarray(image_np[-1:]))[None] if residual else None
        out = []
        for coarse in outputs:
            if residual:
                coarse = coarse - atlas_coarse
            fine = F.interpolate(coarse.float(), scale_factor=factor, mode="trilinear", align_corners=False)
            fine = fine[..., :shape[0], :shape[1], :shape[2]]
            out.append(fine + atlas_full if residual else fine)
        return out

    @torch.no_grad()
    def predict(self, case: Mapping, seed: int = 0) -> dict:
        """{"dose": Gy (z, y, x), "dose_std": voxel-wise spread over members, flips and samples (Gy)}."""
        image_np, cond_np = build_inputs(case, self.spec)
        factor = int(self.spec.get("grid_factor", 1))
        image = torch.from_numpy(coarsen(image_np, factor))[None].to(self.device)
        cond = torch.from_numpy(cond_np)[None].to(self.device)
        outputs = []
        for index, (model, prep) in enumerate(self.members):
            member = self._member_outputs(model, prep, image, cond, seed + index)
            if factor > 1:
                residual = getattr(model, "residual_input_channel", None) is not None
                member = self._to_case_grid(member, image_np, factor, residual)
            outputs += member
        stacked = torch.stack(outputs).float()  # (n, 1, 1, z, y, x)
        rx = float(case["prescription_gy"])
        body = torch.as_tensor(np.asarray(case["possible_dose_mask"], np.float32))
        stacked = stacked.clamp(0.0, float(self.cfg["clamp_max_rx"])) * rx * body
        mean = stacked.mean(0)[0, 0]
        std = stacked.std(0, unbiased=False)[0, 0] if stacked.shape[0] > 1 else torch.zeros_like(mean)
        return {"dose": mean.numpy().astype(np.float32), "dose_std": std.numpy().astype(np.float32),
                "n_outputs": int(stacked.shape[0])}
