"""Lens mass and light profiles in torch, in lenstronomy's conventions (so pixels compare with lenstronomy 1.14).

Every function broadcasts: coordinates ``x, y`` (arcsec) of shape [..., H, W] and parameters of shape
[..., 1, 1] (a batch of lenses renders in one call). All functions are differentiable in every parameter.

Conventions (lenstronomy.Util.param_util, LensModel/Profiles/nie.py, LightModel/Profiles/sersic.py):
- ellipticity (e1, e2) = (1 − q)/(1 + q) · (cos 2φ, sin 2φ); φ = atan2(e2, e1)/2, |e| clipped at 0.9999.
- SIE: Kormann, Schneider & Bartelmann (1994); Keeton & Kochanek (1998) eq. 8 with a core s → 0.
  θ_E is the product-average Einstein radius, b = θ_E·√q.
- SHEAR: α = (γ1 x + γ2 y, γ2 x − γ1 y) about the origin.
- SERSIC_ELLIPSE: I(R) = amp · exp{−b_n[(R/R_sersic)^(1/n) − 1]}, b_n = 1.9992 n − 0.3271
  (lenstronomy's approximation), R = √(q x'² + y'²/q) (product-average radius).
"""

from __future__ import annotations

import math

import torch

# lenstronomy's SIE is an NIE with this tiny core (LensModel/Profiles/sie.py); it also keeps ψ > 0 at the
# lens centre so values and gradients stay finite there.
SIE_CORE_ARCSEC = 1e-10
MAX_ECCENTRICITY = 0.9999  # param_util.ellipticity2phi_q clips |e| here
SERSIC_SMOOTHING_ARCSEC = 1e-4  # SersicUtil(smoothing=0.0001): R and R_sersic floored here
SERSIC_MAX_R_FRAC = 1000.0  # lenstronomy zeroes the profile beyond 1000 R_sersic


def _tiny(dtype: torch.dtype) -> float:
    return 1e-20 if dtype == torch.float64 else 1e-12


def ellipticity_to_phi_q(e1: torch.Tensor, e2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e1, e2) → (φ, q, c=|e|). At e = 0 exactly, φ = 0 and the gradient w.r.t. e is taken as 0
    (atan2 is singular there); everywhere else it is exact."""
    c2 = e1 * e1 + e2 * e2
    small = c2 < _tiny(e1.dtype)
    e1_safe = torch.where(small, torch.ones_like(e1), e1)
    e2_safe = torch.where(small, torch.zeros_like(e2), e2)
    phi = torch.atan2(e2_safe, e1_safe) / 2
    c = torch.sqrt(torch.where(small, torch.full_like(c2, _tiny(e1.dtype)), c2)).clamp(max=MAX_ECCENTRICITY)
    q = (1 - c) / (1 + c)
    return phi, q, c


def phi_q_to_ellipticity(phi, q):
    """Inverse of :func:`ellipticity_to_phi_q` (works on floats, numpy arrays and tensors)."""
    lib = torch if isinstance(phi, torch.Tensor) else __import__("numpy")
    c = (1 - q) / (1 + q)
    return c * lib.cos(2 * phi), c * lib.sin(2 * phi)


def sie_deflection(x, y, theta_E, e1, e2, center_x, center_y) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection (α_x, α_y) in arcsec of a singular isothermal ellipsoid.

    In the frame rotated by φ (x' along the major axis), with b = θ_E√q, ψ = √(q²(s² + x'²) + y'²)
    (Keeton & Kochanek 1998, eq. 8 and after; lenstronomy NIEMajorAxis):
        α'_x = b/√(1−q²) · arctan(√(1−q²) x' / (ψ + s)),
        α'_y = b/√(1−q²) · arctanh(√(1−q²) y' / (ψ + q² s)),
    then rotated back by φ. √(1−q²) = 2√c/(1+c) is computed from c = |e| without cancellation.
    """
    return sie_deflection_from_coefficients(x, y, center_x, center_y, *sie_coefficients(theta_E, e1, e2))


def sie_coefficients(theta_E, e1, e2) -> tuple[torch.Tensor, ...]:
    """The per-lens constants of :func:`sie_deflection`: (cos φ, sin φ, q², s, k = √(1−q²), b/k).

    Computed once per lens (and outside a compiled per-pixel kernel, where each would otherwise be
    re-evaluated for every vector of pixels)."""
    phi, q, c = ellipticity_to_phi_q(e1, e2)
    s = SIE_CORE_ARCSEC / torch.sqrt(q)
    # k = √(1 − q²) = 2√c/(1 + c) >= 2·10⁻⁵ (float64) or 2·10⁻³ (float32) because |e| is floored in
    # ellipticity_to_phi_q, so arctan(k u)/k needs no q → 1 special case: it equals u to within k²u²/3.
    k = 2 * torch.sqrt(c) / (1 + c)
    return torch.cos(phi), torch.sin(phi), q * q, s, k, theta_E * torch.sqrt(q) / k


def sie_deflection_from_coefficients(x, y, center_x, center_y, cos_phi, sin_phi, q2, s, k, scale,
                                     fast_math: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pixel part of :func:`sie_deflection`, from :func:`sie_coefficients` (``scale`` = b/k).
    ``fast_math``: arctan by :func:`atan_ratio_f32` and the atanh's log by :func:`log_f32` (float32 only:
    the compiled CPU renderer) instead of ``torch.atan`` and ``torch.log``."""
    dx, dy = x - center_x, y - center_y
    xr = dx * cos_phi + dy * sin_phi
    yr = dy * cos_phi - dx * sin_phi
    psi = torch.sqrt(q2 * (xr * xr + s * s) + yr * yr)
    limit = 1 - (1e-15 if x.dtype == torch.float64 else 1e-7)  # |k v| < 1 holds; guard rounding only
    if fast_math:
        ax_r = scale * atan_ratio_f32(k * xr, psi + s)
    else:
        ax_r = scale * torch.atan(k * xr / (psi + s))
    # atanh v = ½·log1p(2v/(1 − v)): exact, and accurate for small v also where a compiled (vectorized)
    # atanh is not (torch.compile's CPU atanh lost 3e-5 relative at k ≈ 2e-3, a round lens in float32).
    # With v = N/D, 2v/(1 − v) = 2N/(D − N): one division; clamped where |v| would reach 1 by rounding
    num, den = k * yr, psi + q2 * s
    u = (2 * num / (den - num)).clamp(-2 * limit / (1 + limit), 2 * limit / (1 - limit))
    ay_r = scale * 0.5 * log1p_from_log(u, fast_math)
    return ax_r * cos_phi - ay_r * sin_phi, ax_r * sin_phi + ay_r * cos_phi


def log1p_from_log(u: torch.Tensor, fast_math: bool = False) -> torch.Tensor:
    """log(1 + u) for u > −1 from one ``log`` and a division, accurate to a few ulp also for small |u|:
    with w = fl(1 + u) and its rounding error e = (w − 1) − u (exact in floating point),
    log(1 + u) = log(w) − log(1 + e/w) ≈ log(w) − e/w, the neglected term being (e/w)²/2 ≤ 2⁻⁴⁹
    (the correction of Goldberg 1991, "What every computer scientist should know about floating-point
    arithmetic", Theorem 4, in its first-order form). Gradients are those of log(w), 1/w.

    Used instead of ``torch.log1p`` because torch.compile's vectorized CPU log1p (SLEEF's double-float
    ``log1pf_u10``) costs ~10x a vectorized ``log`` in isolation (8.7 vs 0.8 ns per float32 value, one
    thread; 1-5 % of the whole compiled renderer). ``fast_math``: the log by :func:`log_f32`."""
    w = 1 + u
    return (log_f32(w) if fast_math else torch.log(w)) - ((w - 1) - u) / w


# Cephes logf.c (S. L. Moshier, Cephes Math Library 2.2, 1992): x = m·2^e with m in [√½, √2), then
# log(1 + f), f = m − 1, as f − f²/2 + f³·P(f), P of degree 8, and e·ln 2 split into two constants
SQRT_HALF = 0.70710678118654752
LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
            -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive, normal float32 values (callers floor their arguments: the Sérsic radius at the
    smoothing scale, 1 + u in the atanh above 5e-8), within 1 ulp (0.74 measured against float64 in the tests): Cephes
    ``logf``, with the exponent and mantissa read from the bits (an integer shift and mask) instead of
    ``frexp``, written as elementwise tensor arithmetic. Under torch.compile on a CPU this is inlined into the
    fused pixel loop, where ``torch.log`` is a call into SLEEF (``logf_u10``) and every live vector register
    is saved around each call (the loop makes 3 such calls per sub-pixel): 18-19 % faster renderer at 101 px,
    supersampling 3 (the README's speed section). Zero, negatives and denormals are outside its domain
    (finite nonsense); NaN gives NaN and inf NaN (``+ (x − x)``, 0 for finite x), so a bad parameter still
    shows in the image. Where a gradient is needed it is ``torch.log``'s (the value then is torch's too)."""
    if x.requires_grad:
        return torch.log(x)
    bits = x.view(torch.int32)
    exponent = ((bits >> 23) - 126).to(x.dtype)  # x = m·2^exponent with m in [0.5, 1)
    mantissa = ((bits & 0x007FFFFF) | 0x3F000000).view(x.dtype)
    low = mantissa < SQRT_HALF  # m in [0.5, √½): use 2m in [1, √2) and exponent − 1
    exponent = torch.where(low, exponent - 1.0, exponent)
    f = torch.where(low, mantissa + mantissa - 1.0, mantissa - 1.0)
    z = f * f
    p = LOG_POLY[0]
    for c in LOG_POLY[1:]:
        p = p * f + c
    return f + (p * f * z + LN2_LOW * exponent - 0.5 * z) + LN2_HIGH * exponent + (x - x)


# Cephes atanf.c (S. L. Moshier, Cephes Math Library 2.2, 1992): arctan t = π/2 + arctan(−1/t) for
# t > tan 3π/8, π/4 + arctan((t − 1)/(t + 1)) for t > tan π/8, then t + t z P(z), z = t², P of degree 3
TAN_3PI_8 = 2.414213562373095
TAN_PI_8 = 0.4142135623730950
ATAN_POLY = (8.05374449538e-2, -1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1)


def atan_ratio_f32(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """arctan(num/den) for den > 0 in float32, to 3e-7 relative (measured against float64 in the tests):
    Cephes ``atanf``'s range reduction applied to the ratio, so that the reduction's division is the only
    one, and its minimax polynomial, written as elementwise tensor arithmetic. Under torch.compile on a CPU
    this is inlined into the fused pixel loop, where ``torch.atan`` is a call into SLEEF's ``atanf_u10``
    (1 ulp, twice the cost in isolation, and live vector registers saved around the call): 6 % faster
    renderer at 101 px, supersampling 3."""
    a = num.abs()
    big = a > TAN_3PI_8 * den
    mid = a > TAN_PI_8 * den
    t = torch.where(big, -den, torch.where(mid, a - den, a)) / torch.where(big, a, torch.where(mid, a + den, den))
    offset = torch.where(big, math.pi / 2, torch.where(mid, math.pi / 4, 0.0))
    z = t * t
    p = ((ATAN_POLY[0] * z + ATAN_POLY[1]) * z + ATAN_POLY[2]) * z + ATAN_POLY[3]
    y = offset + p * z * t + t
    return torch.where(num < 0, -y, y)  # not torch.copysign: its vectorized form is an external call


def shear_deflection(x, y, gamma1, gamma2, ra_0=0.0, dec_0=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """External shear (lenstronomy SHEAR): α = (γ1 x + γ2 y, γ2 x − γ1 y) about (ra_0, dec_0)."""
    dx = x if isinstance(ra_0, float) and ra_0 == 0.0 else x - ra_0
    dy = y if isinstance(dec_0, float) and dec_0 == 0.0 else y - dec_0
    return gamma1 * dx + gamma2 * dy, gamma2 * dx - gamma1 * dy


def sersic_b_n(n_sersic: torch.Tensor) -> torch.Tensor:
    """b_n = 1.9992 n − 0.3271 (lenstronomy SersicUtil.b_n; Ciotti & Bertin 1999 give the exact series)."""
    return (1.9992 * n_sersic - 0.3271).clamp(min=1e-5)


def sersic_ellipse(x, y, amp, R_sersic, n_sersic, e1, e2, center_x, center_y) -> torch.Tensor:
    """Elliptical Sérsic surface brightness (lenstronomy SERSIC_ELLIPSE, product-average radius).

    R = |T(x − c)| with T = [[1 − e1, −e2], [−e2, 1 + e1]] / √(1 − e1² − e2²), which equals
    √(q x'² + y'²/q) (lenstronomy param_util.transform_e1e2_product_average). ``amp`` is the surface
    brightness at R_sersic (per arcsec²).
    """
    return sersic_from_coefficients(x, y, amp, center_x, center_y, *sersic_coefficients(R_sersic, n_sersic, e1, e2))


def sersic_coefficients(R_sersic, n_sersic, e1, e2) -> tuple[torch.Tensor, ...]:
    """The per-profile constants of :func:`sersic_ellipse`: T/R_sersic as (t11, t12, t22), the floor
    (smoothing/R_sersic)² of (R/R_sersic)², b_n·log2(e) and log2(e)/(2n). R and R_sersic are floored at the
    smoothing scale."""
    norm = torch.sqrt(torch.clamp(torch.abs(1 - e1 * e1 - e2 * e2), min=1e-6))
    r_eff = torch.clamp(R_sersic, min=SERSIC_SMOOTHING_ARCSEC)
    inv = 1 / (norm * r_eff)
    floor2 = (SERSIC_SMOOTHING_ARCSEC / r_eff) ** 2
    ln2 = math.log(2)
    return (1 - e1) * inv, -e2 * inv, (1 + e1) * inv, floor2, sersic_b_n(n_sersic) / ln2, 0.5 / (ln2 * n_sersic)


def sersic_from_coefficients(x, y, amp, center_x, center_y, t11, t12, t22, floor2, b_n_log2e,
                             half_inv_n_log2e, fast_math: bool = False) -> torch.Tensor:
    """The per-pixel part of :func:`sersic_ellipse`, from :func:`sersic_coefficients`: 4 multiply-adds for
    (u, v) = T(x − c)/R_sersic, then (R/R_sersic)^(1/n) = 2^(ln(u² + v²) log2(e)/2n) and
    exp(b_n(1 − ·)) = 2^(b_n log2(e) (1 − ·)): no square root, one log and two exp2 per pixel, the log2(e)
    factors folded into the per-profile constants. Base 2 because SLEEF's vectorized exp2 is cheaper than
    its exp under torch.compile on a CPU (renderer 7 % faster; ln beat log2 by another 2-3 %). ``fast_math``:
    the log by :func:`log_f32` (float32; the exp2 stays SLEEF's: a Cephes exp2 written the same way made the
    compiled renderer 4-9 % slower)."""
    dx, dy = x - center_x, y - center_y
    u = t11 * dx + t12 * dy
    v = t12 * dx + t22 * dy
    ratio2 = torch.maximum(u * u + v * v, floor2)
    log_ratio2 = log_f32(ratio2) if fast_math else torch.log(ratio2)
    profile = torch.exp2(b_n_log2e - b_n_log2e * torch.exp2(log_ratio2 * half_inv_n_log2e))
    return amp * profile.masked_fill(ratio2 > SERSIC_MAX_R_FRAC**2, 0.0)


def sersic_total_flux(amp, R_sersic, n_sersic):
    """Total flux of a Sérsic profile with surface brightness ``amp`` at R_sersic (product-average radius):
    F = amp · 2π n R² e^{b_n} Γ(2n) / b_n^{2n} (lenstronomy SersicUtil._total_flux; Graham & Driver 2005 eq. 2).

    Works on floats/numpy arrays or tensors; use it to convert magnitudes into ``amp``.
    """
    if isinstance(n_sersic, torch.Tensor):
        bn = sersic_b_n(n_sersic)
        return amp * R_sersic**2 * 2 * math.pi * n_sersic * torch.exp(bn + torch.lgamma(2 * n_sersic)
                                                                        - 2 * n_sersic * torch.log(bn))
    import numpy as np
    from scipy.special import gammaln

    n = np.asarray(n_sersic, dtype=np.float64)
    bn = np.maximum(1.9992 * n - 0.3271, 1e-5)
    return amp * np.asarray(R_sersic) ** 2 * 2 * np.pi * n * np.exp(bn + gammaln(2 * n) - 2 * n * np.log(bn))
