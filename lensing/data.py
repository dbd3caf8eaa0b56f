"""Loading a data set folder (catalog.csv + images) for training and evaluation.

Each item is a dict of tensors:
    input       [C, H, W]  per-band noise-normalized image, clipped at ±clip_sigma (network input); with
                           ``residual_channel`` [2C, H, W]: then each band minus its azimuthal-median model
    image       [C, H, W]  physical units (counts/s per pixel), for the physics loss
    variance    [C, H, W]  variance map; +inf where a pixel is masked (NaN pixel, variance <= 0)
    label       []         1 lens, 0 non-lens, -1 unknown
    pixel_scale [], psf_fwhm [C], noise_sigma [C], index []
    true_params [P]        simulated lens-model truth (NaN where unknown), when the catalogue has it

Per-band noise normalization (Lanusse et al. 2018, CMU DeepLens, Bologna challenge): each band is divided
by its background σ — √median(variance) when a variance map exists, else the ``background_rms`` column,
else 1.4826·MAD of the cutout border — and clipped at ±250σ; optionally followed by an asinh stretch. ``residual_channel`` appends, per band, that input
minus its round model (lensing.baseline.azimuthal_median_model: the median of each 1-pixel annulus around
the centre), the non-axisymmetric light the baseline sums, so the network sees arcs with the galaxy removed.

Bad input: NaN pixels and variance values <= 0 are masked (input 0, variance +inf, i.e. zero weight in
χ²) and counted in one log line per data set; a wrong number of bands or image size is an error naming the
file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from torch.utils.data import Dataset

from lensing.baseline import azimuthal_median_model
from lensing.catalog import CatalogError, band_floats, read_catalog, split_bands
from lensing.storage import ImageFileError, read_array

TRUE_PARAM_COLUMNS = ("true_theta_E", "true_lens_e1", "true_lens_e2", "true_lens_center_x", "true_lens_center_y",
                      "true_gamma1", "true_gamma2")


def border_mad_sigma(image: np.ndarray, width: int = 4) -> np.ndarray:
    """Robust background σ per band from the cutout border: 1.4826 · median |x − median x|."""
    c = image.shape[0]
    border = np.concatenate([image[:, :width].reshape(c, -1), image[:, -width:].reshape(c, -1),
                             image[:, :, :width].reshape(c, -1), image[:, :, -width:].reshape(c, -1)], axis=1)
    med = np.nanmedian(border, axis=1, keepdims=True)
    return 1.4826 * np.nanmedian(np.abs(border - med), axis=1)


def noise_sigma(image: np.ndarray, variance: np.ndarray | None, background_rms: np.ndarray | None) -> np.ndarray:
    """Per-band background σ used for normalization (see the module docstring)."""
    c = image.shape[0]
    if variance is not None:
        valid = np.where(np.isfinite(variance) & (variance > 0), variance, np.nan)
        sigma = np.sqrt(np.nanmedian(valid.reshape(c, -1), axis=1))
    elif background_rms is not None and background_rms.size == c and np.all(background_rms > 0):
        sigma = background_rms.astype(np.float64)
    else:
        sigma = border_mad_sigma(image)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, 1.0)
    return sigma.astype(np.float32)


STRETCHES = ("linear", "asinh")
SIZE_POLICIES = ("crop_pad", "error", "native")


def fit_size(array: np.ndarray, size: int, fill: float) -> np.ndarray:
    """Centre-crop or pad ``array`` [C, H, W] to [C, size, size] (pad value ``fill``).

    The kept/added border is split as (d // 2, d − d // 2), so an odd difference moves the centre by half a
    pixel (to the lower index)."""
    c, h, w = array.shape
    out = np.full((c, size, size), fill, dtype=array.dtype)
    src_y, dst_y = max((h - size) // 2, 0), max((size - h) // 2, 0)
    src_x, dst_x = max((w - size) // 2, 0), max((size - w) // 2, 0)
    ny, nx = min(h, size), min(w, size)
    out[:, dst_y:dst_y + ny, dst_x:dst_x + nx] = array[:, src_y:src_y + ny, src_x:src_x + nx]
    return out


def normalize(image: np.ndarray, sigma: np.ndarray, clip_sigma: float = 250.0, stretch: str = "linear") -> np.ndarray:
    """image / σ_band, clipped at ±clip_sigma; ``stretch="asinh"`` then applies asinh (linear within ±1σ,
    logarithmic beyond: faint arcs and the bright lens galaxy share the input's dynamic range)."""
    if stretch not in STRETCHES:
        raise ValueError(f"input stretch must be one of {STRETCHES}, got {stretch!r}")
    x = np.clip(image / sigma[:, None, None], -clip_sigma, clip_sigma)
    if stretch == "asinh":
        x = np.arcsinh(x)
    return x.astype(np.float32)


class LensingDataset(Dataset):
    """Rows of one data set folder (optionally one split and some surveys); module-level for spawn workers.

    ``expected_bands`` (from the model) turns a mismatch into a clear error naming the file. Cutouts whose
    size differs from ``expected_size`` follow ``size_policy``: ``crop_pad`` (centre crop, or pad with input
    0 / image 0 / variance +inf, i.e. zero χ² weight; counted in one log line), ``error`` (an error naming
    the file) or ``native`` (passed as they are: the network takes any size, but one batch needs one size). ``preload`` reads every file once at construction (small data sets), which also validates them
    all and reports masked pixels in one line through ``log``.
    """

    def __init__(self, folder: str | Path, split: str | None = None, surveys: list[str] | None = None,
                 labels: tuple[int, ...] | None = None, expected_bands: int | None = None,
                 expected_size: int | None = None, clip_sigma: float = 250.0, stretch: str = "linear",
                 preload: bool = True, size_policy: str = "crop_pad", residual_channel: bool = False,
                 on_missing_files: str = "error", log: Callable[[str], None] | None = None,
                 catalog: pd.DataFrame | None = None):
        self.folder = Path(folder)
        df = catalog if catalog is not None else read_catalog(self.folder, on_missing_files=on_missing_files, log=log)
        if split is not None:
            if "split" not in df.columns:
                raise CatalogError(f"{self.folder / 'catalog.csv'}: no 'split' column; run "
                                 "`preprocess_lensing.py split` first or pass split=None")
            df = df[df["split"].astype(str) == split]
        if surveys:
            df = df[df["survey"].isin(list(surveys))]
        if labels is not None:
            df = df[pd.to_numeric(df["label"]).isin(list(labels))]
        if len(df) == 0:
            raise CatalogError(f"{self.folder / 'catalog.csv'}: no rows for split={split!r}, surveys={surveys}, "
                             f"labels={labels}")
        self.catalog = df.reset_index(drop=True)
        self.expected_bands = expected_bands
        self.expected_size = expected_size
        if size_policy not in SIZE_POLICIES:
            raise ValueError(f"data.size_policy must be one of {list(SIZE_POLICIES)}, got {size_policy!r}")
        self.size_policy = size_policy
        self.resized = {"cropped": 0, "padded": 0}
        self.clip_sigma = float(clip_sigma)
        self.stretch = stretch
        self.residual_channel = bool(residual_channel)
        self.log = log or (lambda message: None)
        self.has_true_params = all(c in self.catalog.columns for c in TRUE_PARAM_COLUMNS)
        self.masked_counts = {"nan_pixels": 0, "nonpositive_variance": 0, "images_with_masks": 0}
        self._cache: list[dict] | None = None
        if preload:
            self._cache = [self._load(i) for i in range(len(self.catalog))]
            self.report_masks()

    def __len__(self) -> int:
        return len(self.catalog)

    def report_masks(self) -> None:
        m = self.masked_counts
        if m["images_with_masks"]:
            self.log(f"[lensing] {self.folder}: masked {m['nan_pixels']} NaN pixel(s) and "
                     f"{m['nonpositive_variance']} variance value(s) <= 0 in {m['images_with_masks']} image(s) "
                     "(input 0, zero weight in chi2)")
        if self.resized["cropped"] or self.resized["padded"]:
            self.log(f"[lensing] {self.folder}: size_policy crop_pad: {self.resized['cropped']} cutout(s) centre-cropped "
                     f"and {self.resized['padded']} padded to {self.expected_size}x{self.expected_size} px")

    def _load(self, i: int) -> dict:
        row = self.catalog.iloc[i]
        image_path = self.folder / str(row["image_path"])
        image = read_array(image_path, row.get("image_scale"), row.get("image_offset"))
        bands = split_bands(row["bands"])
        if image.shape[0] != len(bands):
            raise ImageFileError(f"{image_path}: {image.shape[0]} band(s) in the file but the catalogue column "
                                 f"'bands' lists {len(bands)} ({row['bands']})")
        if self.expected_bands is not None and image.shape[0] != self.expected_bands:
            raise ImageFileError(f"{image_path}: {image.shape[0]} band(s), but the model expects "
                                 f"{self.expected_bands}")
        if self.expected_size is not None and self.size_policy == "error" \
                and image.shape[1:] != (self.expected_size, self.expected_size):
            raise ImageFileError(f"{image_path}: image size {image.shape[1:]}, but the model expects "
                                 f"{self.expected_size}x{self.expected_size} (data.size_policy: error; crop_pad "
                                 "centre-crops or pads)")
        variance = None
        var_name = row.get("variance_path")
        if isinstance(var_name, str) and var_name.strip():
            var_path = self.folder / var_name
            variance = read_array(var_path, row.get("variance_scale"), row.get("variance_offset"))
            if variance.shape != image.shape:
                raise ImageFileError(f"{var_path}: variance shape {variance.shape} differs from the image "
                                     f"{image.shape} ({image_path})")
        bkg = band_floats(row.get("background_rms"))
        sigma = noise_sigma(image, variance, bkg if bkg.size else None)
        nan_mask = ~np.isfinite(image)
        bad_var = np.zeros_like(nan_mask) if variance is None else ~(np.isfinite(variance) & (variance > 0))
        if variance is None:  # no map: background-only variance
            variance = np.broadcast_to((sigma**2)[:, None, None], image.shape).astype(np.float32).copy()
        mask = nan_mask | bad_var
        if mask.any():
            self.masked_counts["nan_pixels"] += int(nan_mask.sum())
            self.masked_counts["nonpositive_variance"] += int((bad_var & ~nan_mask).sum())
            self.masked_counts["images_with_masks"] += 1
            image = np.where(mask, 0.0, image).astype(np.float32)
            variance = np.where(mask, np.inf, variance).astype(np.float32)
        size = self.expected_size
        if size is not None and self.size_policy == "crop_pad" and image.shape[1:] != (size, size):
            key = "cropped" if max(image.shape[1:]) > size else "padded"
            self.resized[key] += 1
            image = fit_size(np.asarray(image, dtype=np.float32), size, 0.0)
            variance = fit_size(np.asarray(variance, dtype=np.float32), size, np.inf)  # σ from the full cutout
        fwhm = band_floats(row.get("band_psf_fwhm"))
        if fwhm.size != image.shape[0]:
            fwhm = np.full(image.shape[0], float(row["psf_fwhm"]))
        network_input = normalize(image, sigma, self.clip_sigma, self.stretch)
        if self.residual_channel:  # + per band, the input minus its round (azimuthal-median) model
            network_input = np.concatenate([network_input, network_input - azimuthal_median_model(network_input)])
        item = {
            "input": torch.from_numpy(np.ascontiguousarray(network_input, dtype=np.float32)),
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "variance": torch.from_numpy(np.ascontiguousarray(variance, dtype=np.float32)),
            "label": torch.tensor(float(row["label"]), dtype=torch.float32),
            "pixel_scale": torch.tensor(float(row["pixel_scale"]), dtype=torch.float32),
            "psf_fwhm": torch.from_numpy(fwhm.astype(np.float32)),
            "noise_sigma": torch.from_numpy(sigma),
            "index": torch.tensor(i, dtype=torch.int64),
        }
        if self.has_true_params:
            item["true_params"] = torch.tensor([float(row[c]) for c in TRUE_PARAM_COLUMNS], dtype=torch.float32)
        return item

    def __getitem__(self, i: int) -> dict:
        if self._cache is not None:
            return dict(self._cache[i])
        item = self._load(i)
        return item

    def labels(self) -> np.ndarray:
        return pd.to_numeric(self.catalog["label"]).to_numpy()


def transform_true_params(params: torch.Tensor, k: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Lens-model truth [B, 7] (θ_E, e1, e2, x, y, γ1, γ2) under ``augment_batch``'s flip then k·rot90.

    A flip of the x axis maps (x, y) → (−x, y) and φ → π − φ, so e2, x and γ2 change sign. One
    torch.rot90(dims=(-2, -1)) maps (x, y) → (y, −x) (a −90° rotation): the spin-2 quantities (e1, e2) and
    (γ1, γ2) rotate by −180°, i.e. change sign.
    """
    out = params.clone()
    f = flip.to(params.device)
    for col in (2, 3, 6):
        out[:, col] = torch.where(f, -out[:, col], out[:, col])
    kk = k.to(params.device) % 4
    x, y = out[:, 3].clone(), out[:, 4].clone()
    out[:, 3] = torch.where(kk == 1, y, torch.where(kk == 2, -x, torch.where(kk == 3, -y, x)))
    out[:, 4] = torch.where(kk == 1, -x, torch.where(kk == 2, -y, torch.where(kk == 3, x, y)))
    odd = (kk % 2 == 1)
    for col in (1, 2, 5, 6):
        out[:, col] = torch.where(odd, -out[:, col], out[:, col])
    return out


def augment_batch(batch: dict, generator: torch.Generator | None = None) -> dict:
    """Random flips and 90° rotations, the same per sample for input, image and variance (the dihedral
    group D4; lens finding is invariant to it); simulated lens-model truth is transformed to match.
    """
    x = batch["input"]
    b = x.shape[0]
    k = torch.randint(0, 4, (b,), generator=generator)
    flip = torch.randint(0, 2, (b,), generator=generator).bool()
    out = dict(batch)
    for key in ("input", "image", "variance"):
        if key not in batch:
            continue
        t = batch[key]
        t = torch.where(flip[:, None, None, None].to(t.device), torch.flip(t, dims=(-1,)), t)
        rotated = torch.stack([torch.rot90(t[i], int(k[i]), dims=(-2, -1)) for i in range(b)])
        out[key] = rotated
    if "true_params" in batch:
        out["true_params"] = transform_true_params(batch["true_params"], k, flip)
    return out
