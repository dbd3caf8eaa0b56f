"""Names of the RSNA 2024 lumbar spine competition: conditions, levels, grades, series, row ids.

Spellings follow the competition files exactly (notes/rsna_spine.md): ``train.csv`` columns are
``{condition}_{level}`` in snake case, ``train_label_coordinates.csv`` uses title case ("Spinal Canal
Stenosis", "L1/L2"), ``train.csv`` grades are "Normal/Mild", "Moderate", "Severe".
"""

from __future__ import annotations

CONDITIONS = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
CONDITION_TITLES = {
    "spinal_canal_stenosis": "Spinal Canal Stenosis",
    "left_neural_foraminal_narrowing": "Left Neural Foraminal Narrowing",
    "right_neural_foraminal_narrowing": "Right Neural Foraminal Narrowing",
    "left_subarticular_stenosis": "Left Subarticular Stenosis",
    "right_subarticular_stenosis": "Right Subarticular Stenosis",
}
TITLE_TO_CONDITION = {v.lower(): k for k, v in CONDITION_TITLES.items()}

LEVELS = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
LEVEL_TITLES = {"l1_l2": "L1/L2", "l2_l3": "L2/L3", "l3_l4": "L3/L4", "l4_l5": "L4/L5", "l5_s1": "L5/S1"}
TITLE_TO_LEVEL = {v.lower(): k for k, v in LEVEL_TITLES.items()}

# Grades: index = class id used everywhere (0 normal/mild, 1 moderate, 2 severe).
GRADES = ("Normal/Mild", "Moderate", "Severe")
GRADE_TO_CLASS = {g.lower(): i for i, g in enumerate(GRADES)}
SUBMISSION_COLUMNS = ("normal_mild", "moderate", "severe")
# Official sample weights by true class (Kaggle metric): normal_mild 1, moderate 2, severe 4.
METRIC_CLASS_WEIGHTS = (1.0, 2.0, 4.0)

# Condition groups of the metric and the series each condition is read from.
GROUP_OF_CONDITION = {
    "spinal_canal_stenosis": "spinal",
    "left_neural_foraminal_narrowing": "foraminal",
    "right_neural_foraminal_narrowing": "foraminal",
    "left_subarticular_stenosis": "subarticular",
    "right_subarticular_stenosis": "subarticular",
}
GROUPS = ("spinal", "foraminal", "subarticular")
SIDE_OF_CONDITION = {
    "spinal_canal_stenosis": None,
    "left_neural_foraminal_narrowing": "left",
    "right_neural_foraminal_narrowing": "right",
    "left_subarticular_stenosis": "left",
    "right_subarticular_stenosis": "right",
}
# A left-right flip of the patient turns each left condition into its right twin (flip TTA, augmentation).
MIRROR_CONDITION = {
    "spinal_canal_stenosis": "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing": "right_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing": "left_neural_foraminal_narrowing",
    "left_subarticular_stenosis": "right_subarticular_stenosis",
    "right_subarticular_stenosis": "left_subarticular_stenosis",
}

SERIES_TYPES = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")
SERIES_KEY = {"Sagittal T1": "sag_t1", "Sagittal T2/STIR": "sag_t2", "Axial T2": "axial_t2"}
SERIES_OF_GROUP = {"spinal": "sag_t2", "foraminal": "sag_t1", "subarticular": "axial_t2"}
ORIENTATION_OF_SERIES = {"sag_t1": "sagittal", "sag_t2": "sagittal", "axial_t2": "axial"}

TARGET_COLUMNS = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)


def condition_index(condition: str) -> int:
    return CONDITIONS.index(condition)


def level_index(level: str) -> int:
    return LEVELS.index(level)


def row_id(study_id: int | str, condition: str, level: str) -> str:
    """``44036939_left_neural_foraminal_narrowing_l1_l2`` (sample_submission.csv)."""
    return f"{study_id}_{condition}_{level}"


def parse_row_id(text: str) -> tuple[str, str, str]:
    """Inverse of :func:`row_id`: (study_id, condition, level); a clear error for anything else."""
    parts = str(text).split("_")
    if len(parts) < 4:
        raise ValueError(f"row_id '{text}' is not '<study>_<condition>_<level>'")
    study, level = parts[0], "_".join(parts[-2:])
    condition = "_".join(parts[1:-2])
    if condition not in CONDITIONS or level not in LEVELS:
        raise ValueError(f"row_id '{text}': unknown condition '{condition}' or level '{level}'")
    return study, condition, level
