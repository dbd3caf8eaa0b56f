"""__domain__ end to end: preprocess → train → stop mid-epoch → resume exactly → validate."""

import torch

from __domain__ import preprocess___domain__, train___domain__, validate___domain__

SMOKE = ["--config", "configs/__domain__/smoke.yaml", "--device", "cpu"]


def test_pipeline_resumes_exactly_and_beats_the_mean(tmp_path):
    data = tmp_path / "data"
    preprocess___domain__.main(SMOKE + ["--output-dir", str(data)])
    full = train___domain__.main(SMOKE + ["--data", str(data), "--output-dir", str(tmp_path / "full")])
    assert full["epochs_completed"] == 2 and not full["interrupted"]
    cut = tmp_path / "cut"
    first = train___domain__.main(SMOKE + ["--data", str(data), "--output-dir", str(cut), "--stop-after-steps", "11"])
    assert first["interrupted"] and not (cut / "summary.json").exists()
    train___domain__.main(SMOKE + ["--data", str(data), "--output-dir", str(cut), "--resume"])
    a = torch.load(tmp_path / "full" / "checkpoint_last.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "checkpoint_last.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    result = validate___domain__.main(SMOKE + ["--data", str(data), "--checkpoint", str(cut),
                                               "--output-dir", str(tmp_path / "val")])
    assert result["n_models"] == 1 and result["val"]["mae"] < result["baseline_mean_predictor"]["mae"]
