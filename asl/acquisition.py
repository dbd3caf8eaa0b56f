"""Acquisition physics from the data's own metadata (BIDS ASL sidecars), with provenance.

BIDS ASL (https://bids-specification.readthedocs.io, "Arterial Spin Labeling") fields read, per run:

| sidecar field | physics key | when absent |
|---|---|---|
| ArterialSpinLabelingType (PCASL, CASL, VSASL) | ``modes`` | refused (required); PASL and time-encoded refused |
| PostLabelingDelay (s; one value or one per volume) | ``plds_ms`` | refused (required) |
| LabelingDuration (s; PCASL/CASL) | ``tau_ms`` | config value, with a warning |
| LabelingEfficiency | ``alpha_pcasl`` / ``alpha_vsasl`` | the type's default: PCASL 0.85, CASL 0.68 (Alsop et al. MRM 2015), VSASL the config's (0.56, MULTIVERSE) |
| BackgroundSuppression + BackgroundSuppressionNumberPulses (or the length of BackgroundSuppressionPulseTime) | ``n_bs_<mode>`` (efficiency ``alpha_bs1`` per pulse, config) | BackgroundSuppression false: 0 pulses; unknown: config, with a warning |
| MagneticFieldStrength (T) | ``t1_blood_ms``: 1350 at 1.5 T, 1650 at 3 T (Alsop et al. 2015), 2090 at 7 T (Zhang et al. MRM 2013) | config (3 T value), with a warning |
| M0Type, RepetitionTimePreparation of the M0 | M0 source and its T1-recovery correction (asl.invivo) | inferred from the files, with a warning |
| VascularCrushing | recorded; false → a warning (macrovascular signal at short PLDs is not modelled) | recorded as unknown |

Precedence: ``--set physics.KEY=...`` on the command line > the sidecar > the config (which only fills what
the data lacks, and says so). Every value carries its source in :func:`data_physics`'s provenance table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from asl.invivo import InvivoError
from common.errors import InputError

# Labeling efficiency by labeling type (Alsop et al., MRM 2015, ISMRM white paper; VSASL: MULTIVERSE).
TYPE_EFFICIENCY = {"PCASL": 0.85, "CASL": 0.68}
# Arterial blood T1 by field strength (ms): Alsop et al. 2015 (1.5 T, 3 T); Zhang et al. MRM 2013 (7 T).
BLOOD_T1_MS = {1.5: 1350.0, 3.0: 1650.0, 7.0: 2090.0}
SUPPORTED_TYPES = {"PCASL": "pcasl", "CASL": "pcasl", "VSASL": "vsasl"}
# Physics keys taken from the data (everything else, e.g. lambda_blood, t1_tissue_ms, alpha_bs1, comes from config).
DATA_KEYS = ("modes", "plds_ms", "tau_ms", "alpha_pcasl", "alpha_vsasl", "n_bs_pcasl", "n_bs_vsasl", "t1_blood_ms")


class AcquisitionError(InvivoError):
    """A sidecar that describes an acquisition this code cannot model (the message names file and field)."""


def _num(value, where: str, field: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise AcquisitionError(f"{where}: field '{field}' must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise AcquisitionError(f"{where}: field '{field}' must be finite, got {value!r}")
    return out


def _per_volume_unique(value, n_vol: int, keep: Sequence[int], where: str, field: str) -> float | None:
    """A scalar, or a per-volume list whose entries at ``keep`` must all agree."""
    if value is None:
        return None
    arr = np.atleast_1d(np.asarray(value, dtype=object))
    if arr.size == 1:
        return _num(arr[0], where, field)
    if arr.size != n_vol:
        raise AcquisitionError(f"{where}: field '{field}' has {arr.size} values but the series has {n_vol} volumes")
    vals = sorted({round(_num(arr[i], where, field), 6) for i in keep})
    if len(vals) > 1:
        raise AcquisitionError(f"{where}: field '{field}' takes several values {vals} over the label/control volumes "
                               f"(multi-duration or time-encoded designs are not supported)")
    return vals[0] if vals else None


def parse_sidecar(meta: Mapping, where: str, n_vol: int, asl_volumes: Sequence[int]) -> dict:
    """The acquisition of one BIDS run as plain values (JSON-able), before merging with the config.

    Refuses designs that cannot be modelled: PASL, time-encoded / Hadamard, several labeling durations.
    """
    raw_type = str(meta.get("ArterialSpinLabelingType", "")).strip().upper()
    for key in meta:
        low = key.lower()
        if "timeencoded" in low or "hadamard" in low:
            raise AcquisitionError(f"{where}: field '{key}': time-encoded (Hadamard) ASL is not supported; decode it "
                                   f"into per-PLD label/control or deltam volumes first")
    if "HADAMARD" in raw_type or "TIME" in raw_type:
        raise AcquisitionError(f"{where}: field 'ArterialSpinLabelingType' is {raw_type!r}: time-encoded (Hadamard) "
                               f"ASL is not supported")
    if raw_type == "PASL":
        raise AcquisitionError(f"{where}: field 'ArterialSpinLabelingType' is 'PASL': pulsed ASL (QUIPSS II bolus "
                               f"model) is not supported; supported: {sorted(SUPPORTED_TYPES)}")
    if raw_type not in SUPPORTED_TYPES:
        raise AcquisitionError(f"{where}: field 'ArterialSpinLabelingType' is {meta.get('ArterialSpinLabelingType')!r}; "
                               f"supported: {sorted(SUPPORTED_TYPES)}")
    acq: dict = {"type": raw_type, "mode": SUPPORTED_TYPES[raw_type], "warnings": [],
                 "sidecar_file": str(where).replace("\\", "/").rsplit("/", 1)[-1]}
    tau = _per_volume_unique(meta.get("LabelingDuration"), n_vol, asl_volumes, where, "LabelingDuration")
    acq["tau_ms"] = None if tau is None else tau * 1000.0  # BIDS times are seconds
    if acq["mode"] == "pcasl" and tau is None:
        acq["warnings"].append(f"{where}: 'LabelingDuration' missing; the config's labeling duration is used")
    eff = meta.get("LabelingEfficiency")
    acq["labeling_efficiency"] = None if eff is None else _num(eff, where, "LabelingEfficiency")
    if acq["labeling_efficiency"] is not None and not 0 < acq["labeling_efficiency"] <= 1:
        raise AcquisitionError(f"{where}: field 'LabelingEfficiency' must be in (0, 1], got {eff!r}")
    bs = meta.get("BackgroundSuppression")
    if bs is None:
        acq["bs_pulses"] = None
        acq["warnings"].append(f"{where}: 'BackgroundSuppression' missing; the config's pulse count is used")
    elif bs is False or str(bs).lower() == "false":
        acq["bs_pulses"] = 0
    else:
        n = meta.get("BackgroundSuppressionNumberPulses")
        if n is None and meta.get("BackgroundSuppressionPulseTime") is not None:
            n = len(np.atleast_1d(meta["BackgroundSuppressionPulseTime"]))
        if n is None:
            acq["bs_pulses"] = None
            acq["warnings"].append(f"{where}: BackgroundSuppression is true but 'BackgroundSuppressionNumberPulses' "
                                   f"is missing; the config's pulse count is used")
        else:
            acq["bs_pulses"] = int(_num(n, where, "BackgroundSuppressionNumberPulses"))
    field = meta.get("MagneticFieldStrength")
    acq["field_t"] = None if field is None else _num(field, where, "MagneticFieldStrength")
    if acq["field_t"] is None:
        acq["warnings"].append(f"{where}: 'MagneticFieldStrength' missing; the config's blood T1 is used")
    crush = meta.get("VascularCrushing")
    acq["vascular_crushing"] = None if crush is None else bool(crush)
    if crush is not None and not crush:
        acq["warnings"].append(f"{where}: VascularCrushing is false: macrovascular signal at short PLDs is not "
                               f"modelled and biases CBF/ATT there")
    acq["m0_type"] = meta.get("M0Type")
    return acq


def blood_t1_for_field(field_t: float) -> float | None:
    for b0, t1 in BLOOD_T1_MS.items():
        if abs(field_t - b0) < 0.25:
            return t1
    return None


def command_line_physics_keys(set_args: Sequence[str] | None) -> list[str]:
    """Physics keys given with ``--set physics.KEY=VALUE`` (these win over the data's sidecar)."""
    keys = []
    for item in set_args or []:
        key = str(item).split("=", 1)[0].strip()
        if key.startswith("physics."):
            keys.append(key[len("physics."):])
    return keys


def data_physics(subject: Mapping, config_physics: Mapping, overrides: Sequence[str] = (),
                 fit_model: str = "buxton_full") -> tuple[dict, dict, list[str]]:
    """(physics, provenance {key: source}, warnings) for the acquisition in ``subject`` (asl.invivo).

    ``config_physics`` fills what the data lacks; keys in ``overrides`` (from ``--set physics.*``) keep the
    config's value whatever the data says. ``fit_model`` is the PCASL model fitted (predict.fit_model) unless
    ``pcasl_model`` is overridden.
    """
    physics = {k: (list(v) if isinstance(v, list) else v) for k, v in config_physics.items()}
    source = {k: "config" for k in physics}
    warnings: list[str] = []
    where = subject["meta"].get("folder", "input")
    runs = [r for r in subject["meta"].get("runs", []) if r.get("acquisition", {}).get("mode")]

    def put(key, value, src):
        if key in overrides:
            return
        physics[key] = value
        source[key] = src

    # modes and PLDs from the signals actually present
    modes = [m for m in ("pcasl", "vsasl") if m in subject["signals"]]
    put("modes", modes, "data")
    if "modes" in overrides:
        missing = [m for m in physics["modes"] if m not in subject["signals"]]
        if missing:
            raise InputError(f"{where}: --set physics.modes asks for {missing} but the data has {modes}")
    plds = {m: sorted(subject["signals"][m]) for m in physics["modes"]}
    first = plds[physics["modes"][0]]
    for m in physics["modes"][1:]:
        if len(plds[m]) != len(first) or any(abs(a - b) > 1.0 for a, b in zip(plds[m], first)):
            raise InputError(f"{where}: PostLabelingDelay differs between the PCASL ({plds['pcasl']} ms) and VSASL "
                             f"({plds['vsasl']} ms) runs; fit one with --set physics.modes=[pcasl] or [vsasl]")
    if "plds_ms" in overrides:
        given = [float(p) for p in physics["plds_ms"]]
        if len(given) != len(first):
            raise InputError(f"{where}: --set physics.plds_ms has {len(given)} values but the data has {len(first)} "
                             f"PLDs {first} ms")
        source["plds_ms"] = "--set (relabels the data's PLDs in order)"
    else:
        put("plds_ms", [float(p) for p in first], "sidecar PostLabelingDelay" if runs else "file names")
    if not runs:
        warnings.append(f"{where}: no acquisition metadata (per-PLD layout or converted file without sidecar): "
                        f"labeling duration, efficiencies, background suppression and blood T1 come from the config")
    fields = set()
    for r in runs:
        acq = r["acquisition"]
        mode, name = acq["mode"], acq.get("sidecar_file") or r.get("source", "sidecar")
        warnings += acq.get("warnings", [])
        if mode not in physics["modes"]:
            continue
        if mode == "pcasl" and acq.get("tau_ms") is not None:
            put("tau_ms", float(acq["tau_ms"]), f"{name} LabelingDuration")
        if acq.get("labeling_efficiency") is not None:
            put(f"alpha_{mode}", float(acq["labeling_efficiency"]), f"{name} LabelingEfficiency")
        elif acq["type"] in TYPE_EFFICIENCY:
            put(f"alpha_{mode}", TYPE_EFFICIENCY[acq["type"]], f"default for {acq['type']} (Alsop 2015; "
                                                                f"{name} has no LabelingEfficiency)")
        else:
            source[f"alpha_{mode}"] = f"config ({name} has no LabelingEfficiency)"
        if acq.get("bs_pulses") is not None:
            put(f"n_bs_{mode}", int(acq["bs_pulses"]), f"{name} BackgroundSuppression"
                + ("NumberPulses" if acq["bs_pulses"] else " false"))
        else:
            source[f"n_bs_{mode}"] = f"config ({name} does not give the pulse count)"
        if acq.get("field_t") is not None:
            fields.add(float(acq["field_t"]))
    if len(fields) > 1:
        raise InputError(f"{where}: runs disagree on 'MagneticFieldStrength' {sorted(fields)}")
    if fields:
        b0 = fields.pop()
        t1b = blood_t1_for_field(b0)
        if t1b is None:
            warnings.append(f"{where}: no blood T1 default for MagneticFieldStrength {b0:g} T; the config's "
                            f"{physics['t1_blood_ms']:g} ms is used")
        else:
            put("t1_blood_ms", t1b, f"MagneticFieldStrength {b0:g} T (blood T1 default)")
            if abs(b0 - 3.0) > 0.25 and "t1_tissue_ms" not in overrides:
                warnings.append(f"{where}: tissue T1 {physics['t1_tissue_ms']:g} ms is a 3 T value; the data are at "
                                f"{b0:g} T (set physics.t1_tissue_ms)")
    if "pcasl_model" not in overrides:
        physics["pcasl_model"] = fit_model
        source["pcasl_model"] = "predict.fit_model"
    for key in overrides:
        source[key] = "--set" if not str(source.get(key, "")).startswith("--set") else source[key]
    for key in ("alpha_bs1", "lambda_blood", "t1_tissue_ms"):
        if source.get(key) == "config":
            source[key] = "config (BIDS has no field for it)"
    return physics, source, warnings


def network_coverage(data: Mapping, net: Mapping, randomization: Mapping | None) -> list[str]:
    """Why a network trained around ``net`` physics (with ``randomization`` ranges) cannot read data acquired
    with ``data`` physics; an empty list when it can. Effective labeling efficiency = α·α_BS1^n."""
    problems = []
    for mode in net["modes"]:
        if mode not in data["modes"]:
            problems.append(f"the network needs {mode.upper()} data, the input has {[m.upper() for m in data['modes']]}")
    for pld in net["plds_ms"]:
        if not any(abs(float(pld) - float(p)) < 1.0 for p in data["plds_ms"]):
            problems.append(f"PLDs: the network needs {list(net['plds_ms'])} ms, the input has {list(data['plds_ms'])} ms")
            break
    rnd = randomization if randomization and randomization.get("enabled") else None

    def rng(key, nominal):
        if rnd is not None and key in rnd:
            lo, hi = rnd[key]
            return float(lo), float(hi)
        return nominal * 0.99, nominal * 1.01

    t_lo, t_hi = rng("t1_blood_ms", float(net["t1_blood_ms"]))
    if not t_lo - 1e-6 <= float(data["t1_blood_ms"]) <= t_hi + 1e-6:
        problems.append(f"blood T1 {data['t1_blood_ms']:g} ms outside the training range [{t_lo:g}, {t_hi:g}] ms")
    bs_lo, bs_hi = rng("alpha_bs1", float(net["alpha_bs1"]))
    for mode in net["modes"]:
        if mode not in data["modes"]:
            continue
        a_lo, a_hi = rng(f"alpha_{mode}", float(net[f"alpha_{mode}"]))
        n_net = int(net[f"n_bs_{mode}"])
        lo, hi = a_lo * bs_lo ** n_net, a_hi * bs_hi ** n_net
        eff = float(data[f"alpha_{mode}"]) * float(data["alpha_bs1"]) ** int(data[f"n_bs_{mode}"])
        if not lo - 1e-6 <= eff <= hi + 1e-6:
            problems.append(f"{mode.upper()} effective labeling efficiency α·α_BS^n = {eff:.3f} "
                            f"(α {data[f'alpha_{mode}']:g}, {data[f'n_bs_{mode}']} BS pulses) outside the training "
                            f"range [{lo:.3f}, {hi:.3f}] ({n_net} BS pulses)")
    if "pcasl" in net["modes"] and "pcasl" in data["modes"]:
        r_lo, r_hi = rng("tau_rel", 1.0)
        tau_net = float(net["tau_ms"])
        if not tau_net * r_lo - 1e-6 <= float(data["tau_ms"]) <= tau_net * r_hi + 1e-6:
            problems.append(f"labeling duration {data['tau_ms']:g} ms outside the training range "
                            f"[{tau_net * r_lo:g}, {tau_net * r_hi:g}] ms")
    return problems


def m0_recovery_factor(tr_ms: float | None, t1_tissue_ms: float) -> float:
    """Measured M0 = M0 · (1 − exp(−TR/T1t)) for a saturation-recovery M0 scan of repetition time TR
    (Alsop et al. 2015); the true ΔM/M0 is the measured ratio times this factor. 1 when TR is unknown."""
    if tr_ms is None or tr_ms <= 0:
        return 1.0
    return 1.0 - math.exp(-float(tr_ms) / float(t1_tissue_ms))
