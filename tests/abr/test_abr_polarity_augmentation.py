"""Training shows a share of ears inverted (train.polarity_inversion_prob), so the display sign a lab exports
in does not decide the model's output; the draws repeat for a resumed step."""

import torch

from abr import train_abr


def test_inversion_draws_depend_only_on_seed_rank_and_step():
    batch = {"signal": torch.randn(64, 3, 5), "clean": torch.randn(64, 3, 5)}
    first = train_abr.invert_polarity(batch, 0.5, seed=3, rank=0, step=7)
    assert torch.equal(first["inverted"], train_abr.invert_polarity(batch, 0.5, seed=3, rank=0, step=7)["inverted"])
    assert not torch.equal(first["inverted"], train_abr.invert_polarity(batch, 0.5, seed=3, rank=0, step=8)["inverted"])
    assert not train_abr.invert_polarity(batch, 0.0, seed=3, rank=0, step=7)["inverted"].any()


def test_training_inverts_a_share_of_ears_and_their_clean_traces(tiny_config, tiny_cache, tmp_path, monkeypatch):
    original, seen = train_abr.invert_polarity, []

    def recording_inversion(batch, probability, seed, rank, step):
        out = original(batch, probability, seed, rank, step)
        seen.append((probability, batch, out))
        return out

    monkeypatch.setattr(train_abr, "invert_polarity", recording_inversion)
    train_abr.main(["--config", str(tiny_config), "--data", str(tiny_cache), "--output-dir", str(tmp_path / "run"),
                    "--stop-after-steps", "2"])
    assert [probability for probability, _, _ in seen] == [0.5, 0.5]  # the default, at every step
    flags = torch.cat([out["inverted"] for _, _, out in seen])
    assert flags.any() and not flags.all()
    for _, before, after in seen:
        sign = torch.where(after["inverted"], -1.0, 1.0)[:, None, None]
        for key in ("signal", "clean"):
            torch.testing.assert_close(after[key], before[key] * sign)
        torch.testing.assert_close(after["threshold_db"], before["threshold_db"])  # labels unchanged
