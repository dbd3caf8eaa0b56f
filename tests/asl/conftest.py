"""Shared asl test set-up: one tiny data folder and one trained 2-member run, made once per session."""

import pytest

TINY = ["--set", "phantom.size=32", "--set", "data.n_val=2", "--set", "data.n_test=2", "--set", "data.synthetic_slices=1",
        "--set", "noise.eval_snrs=[3.0,10.0]", "--set", "noise.val_snrs=[5.0]", "--set", "model.features=[8,16]",
        "--set", "model.n_groups=4", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
        "--set", "train.batch_size=2", "--set", "train.warmup_steps=1", "--set", "train.n_ensembles=2",
        "--set", "train.target_stats_phantoms=4", "--set", "validate.linearity_k=[1.0,2.0]",
        "--set", "validate.mc_dropout_samples=2", "--set", "benchmark.n_scipy_voxels=20", "--set", "benchmark.repeats=1",
        "--device", "cpu"]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """(root, config args, preprocess summary, train summary): root/data from preprocess_asl (--data DIR),
    root/train from train_asl. The config args end with ``--device cpu``; append another --device to override."""
    from asl import preprocess_asl, train_asl

    root = tmp_path_factory.mktemp("asl")
    cfg = ["--config", "configs/asl/smoke.yaml", "--set", f"data.dir={(root / 'data').as_posix()}", *TINY]
    pre = preprocess_asl.main([*cfg, "--data", str(root / "data")])
    train = train_asl.main([*cfg, "--output-dir", str(root / "train")])
    return root, cfg, pre, train
