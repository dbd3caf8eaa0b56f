"""Exp 14: self-supervised fine-tuning of a trained network on a small in-vivo data set.

In-vivo data has no ground truth, so the loss is data consistency through the nominal physics,
|signal(CBF̂, ATT̂)/S_ref − input| over the brain mask (both in network input units), plus an anchor
|ẑ − ẑ₀| to the predictions of the model before fine-tuning (keeps the simulation-trained solution where the
data do not constrain it, e.g. ATT beyond the last PLD).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch

from asl.data import pad_to_multiple, required_multiple
from asl.invivo import assemble, load_subject
from asl.simulate import simulate_clean
from common.losses import masked_l1


def invivo_slices(path: str, preprocessing: Mapping, mask_threshold: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (Z, C, X, Y) network input, mask (Z, 1, X, Y)) of one in-vivo subject."""
    subject = load_subject(path)
    signals, mask = assemble(subject, preprocessing["physics"], mask_threshold)
    x = torch.from_numpy(np.transpose(signals, (2, 3, 0, 1)) / preprocessing["input_scale"]).float()
    m = torch.from_numpy(np.transpose(mask, (2, 0, 1))[:, None])
    return x, m


def finetune_model(model: torch.nn.Module, preprocessing: Mapping, ft_cfg: Mapping, device,
                   log: Callable[[str], None] = print) -> dict:
    if not ft_cfg["data"]:
        raise ValueError("finetune.enabled is true but finetune.data names no in-vivo data")
    x, mask = invivo_slices(ft_cfg["data"], preprocessing)
    x, size = pad_to_multiple(x, required_multiple(model))
    mask, _ = pad_to_multiple(mask.float(), required_multiple(model))
    x, mask = x.to(device), mask.to(device)
    stats, physics, s_ref = preprocessing["target_stats"], preprocessing["physics"], preprocessing["input_scale"]
    anchor_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        anchor = anchor_model(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(ft_cfg["lr"]))
    gen = torch.Generator().manual_seed(0)

    def losses(idx):
        out = model(x[idx])
        cbf = (out["cbf"] * stats["cbf_std"] + stats["cbf_mean"]).clamp(0, 200)[:, 0]
        att = (out["att"] * stats["att_std"] + stats["att_mean"]).clamp(100, 4000)[:, 0]
        dc = masked_l1(simulate_clean(cbf, att, physics, None) / s_ref, x[idx], mask[idx])
        anc = masked_l1(out["cbf"], anchor["cbf"][idx], mask[idx]) + masked_l1(out["att"], anchor["att"][idx], mask[idx])
        return dc, anc

    def total_dc():
        model.eval()
        with torch.no_grad():
            value = float(losses(torch.arange(x.shape[0], device=device))[0])
        return value

    before = total_dc()
    bs = int(ft_cfg["batch_size"])
    for epoch in range(int(ft_cfg["epochs"])):
        model.train()
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        for s in range(0, len(order), bs):
            dc, anc = losses(order[s:s + bs])
            loss = dc + float(ft_cfg["anchor_weight"]) * anc
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        log(f"fine-tuning epoch {epoch + 1}: data consistency {dc.item():.4f}, anchor {anc.item():.4f}")
    after = total_dc()
    model.eval()
    return {"data": str(ft_cfg["data"]), "slices": int(x.shape[0]), "dc_before": before, "dc_after": after}
