"""The scattering transform and the scatnet model built on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsilo.errors import ConfigError
from fedsilo.privacy.fingerprint import fingerprint
from fedsilo.task.builtin import builtin_task
from fedsilo.task.data import Dataset
from fedsilo.task.features import cached_features, featurize
from fedsilo.task.models import ScatterFeatures, ScatterNet
from fedsilo.task.rng import SeededRandom
from fedsilo.task.scattering import Scattering2D
from fedsilo.task.train import DPTrainer, evaluate

# Produced once by kymatio 0.3.0's ScatteringTorch2D(J=2, shape=(28, 28), L=8) on
# the three images stored with it (two uniform-noise images and a rectangle).
REF = Path(__file__).parent / "data" / "kymatio_scattering_ref.npz"


def test_matches_kymatio_reference() -> None:
    ref = np.load(REF)
    out = Scattering2D()(torch.from_numpy(ref["x"]))
    assert out.shape == (3, 81, 7, 7)
    np.testing.assert_allclose(out.numpy(), ref["s"], atol=1e-5, rtol=1e-4)


def test_wavelet_coefficients_of_a_constant_image_vanish() -> None:
    # Morlet wavelets have zero mean: only the low-pass (order 0) sees a constant.
    out = Scattering2D()(torch.full((1, 1, 28, 28), 0.7))
    assert torch.allclose(out[:, 0], torch.full((1, 7, 7), 0.7), atol=1e-4)
    assert out[:, 1:].abs().max() < 1e-4


def test_nearly_invariant_to_a_one_pixel_shift() -> None:
    ref = torch.from_numpy(np.load(REF)["x"][2:3])
    moved = torch.roll(ref, shifts=1, dims=-1)
    scat = Scattering2D()
    a, b = scat(ref), scat(moved)
    pixels = (ref - moved).norm() / ref.norm()  # 0.5: the rectangle's edges move
    assert (a - b).norm() / a.norm() < 0.5 * pixels


def test_has_no_state_to_train_or_send() -> None:
    scat = Scattering2D()
    assert list(scat.parameters()) == []
    assert scat.state_dict() == {}


def test_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="expects"):
        Scattering2D()(torch.zeros(2, 3, 28, 28))


def test_scatnet_task_trains_only_a_linear_model_on_its_fixed_front() -> None:
    task = builtin_task("fashion-mnist")  # auto: scatnet for 28x28 images
    assert task is builtin_task("fashion-mnist", "scatnet")
    model = task.build(seed=0)
    assert isinstance(model, torch.nn.Linear)
    assert sorted(model.state_dict()) == ["bias", "weight"]
    front = task.build_front()
    assert isinstance(front, ScatterFeatures) and not front.state_dict()
    assert builtin_task("digits").front is None
    with pytest.raises(ConfigError, match="needs 1x28x28"):
        builtin_task("digits", "scatnet")


def test_head_on_features_equals_the_whole_model() -> None:
    torch.manual_seed(1)
    data = Dataset(torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,)), 10, "t")
    model = ScatterNet()
    front, head = model.front, model.head
    feats = featurize(front, data)
    assert torch.allclose(head(feats.x), model(data.x), atol=1e-5)
    assert evaluate(head, feats) == pytest.approx(evaluate(model, data))


def test_dp_step_on_the_head_clips_per_example() -> None:
    torch.manual_seed(2)
    model = ScatterNet()
    front, head = model.front, model.head
    feats = featurize(
        front, Dataset(torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,)), 10, "t")
    )
    trainer = DPTrainer(
        head,
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        expected_batch_size=32,
        lr=1.0,
        rng=SeededRandom(0),
    )
    sums, _, norms = trainer.clipped_grad_sums(feats.x, feats.y)
    assert norms.max() > 0.1  # clipping binds
    total = torch.cat([g.flatten() for g in sums.values()]).norm()
    assert total <= 32 * 0.1 + 1e-4


def test_feature_cache_reuses_and_repairs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    data = Dataset(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), 10, "t")
    scat = Scattering2D()
    first = cached_features(
        scat, data, tmp_path, front_key=scat.cache_key, data_id=fingerprint(data)
    )
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    files[0].write_bytes(b"not a tensor")  # a damaged cache is recomputed, not trusted
    again = cached_features(
        scat, data, tmp_path, front_key=scat.cache_key, data_id=fingerprint(data)
    )
    assert torch.equal(first.x, again.x)
    assert torch.equal(torch.load(files[0], weights_only=True)["x"], first.x)
    other = Dataset(data.x.flip(0), data.y.flip(0), 10, "t")
    cached_features(scat, other, tmp_path, front_key=scat.cache_key, data_id=fingerprint(other))
    assert len(list(tmp_path.glob("*.pt"))) == 2  # different examples, different entry


def test_feature_cache_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    from fedsilo.task.features import drop_cache, write_cached

    old = os.umask(0o022)
    try:
        cache = tmp_path / "site" / "feature-cache"
        write_cached(cache / "a.pt", {"x": torch.zeros(2)})
        wide = tmp_path / "wide"
        wide.mkdir(mode=0o755)
        write_cached(wide / "b.pt", {"x": torch.zeros(2)})  # an existing folder is narrowed
    finally:
        os.umask(old)
    for folder, name in ((cache, "a.pt"), (wide, "b.pt")):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    drop_cache(cache)
    assert not cache.exists()
