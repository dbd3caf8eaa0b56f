"""A non-learned reference score: non-axisymmetric flux around the central galaxy.

Lensed arcs are extended, tangential, off-centre light; a smooth elliptical galaxy is nearly
axisymmetric. For each noise-normalized cutout (band sum), the azimuthal median in 1-pixel annuli around
the centre is subtracted (a round model of the galaxy) and the positive residual, in σ units, is summed
over an annulus of ``inner``–``outer`` of the half width. Neighbours and elliptical isophotes also leave
residuals, so this is a weak but honest baseline the network must beat (lenses vs. the data set's
neighbour confusers).
"""

from __future__ import annotations

import numpy as np


def azimuthal_residual_score(inputs: np.ndarray, inner: float = 0.1, outer: float = 0.8) -> np.ndarray:
    """Scores [N] for noise-normalized inputs [N, C, H, W] (higher = more lens-like)."""
    x = np.asarray(inputs, dtype=np.float64).sum(axis=1) / np.sqrt(inputs.shape[1])
    n, h, w = x.shape
    yy, xx = np.mgrid[0:h, 0:w]
    radius = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    ring = np.floor(radius).astype(int)
    half = min(h, w) / 2
    use = (radius >= inner * half) & (radius <= outer * half)
    scores = np.empty(n)
    rings = np.unique(ring[use])
    for i in range(n):
        model = np.zeros((h, w))
        for r in rings:
            sel = ring == r
            model[sel] = np.median(x[i][sel])
        residual = np.clip(x[i] - model, 0, None)
        scores[i] = residual[use].sum() / np.sqrt(use.sum())
    return scores
