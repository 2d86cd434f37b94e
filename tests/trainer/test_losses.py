"""Loss parts: reconstruction, KL, hinge GAN, adaptive weight, perceptual loading."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.losses import (
    PatchDiscriminator3D,
    adaptive_weight,
    d_hinge_loss,
    g_hinge_loss,
    kl_loss,
    load_perceptual,
    recon_loss,
    vgg16_features,
)


def test_recon_and_kl() -> None:
    x = torch.zeros(2, 3, 5, 8, 8)
    assert recon_loss(x, x + 0.5, "l1") == pytest.approx(0.5)
    assert recon_loss(x, x + 0.5, "mse") == pytest.approx(0.25)
    mean, logvar = torch.zeros(2, 16, 2, 1, 1), torch.zeros(2, 16, 2, 1, 1)
    assert kl_loss(mean, logvar) == pytest.approx(0.0)
    # Per sample: 0.5 * sum(mu^2) over 32 latent elements with mu = 1.
    assert kl_loss(mean + 1, logvar) == pytest.approx(16.0)


def test_hinge_losses() -> None:
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert d_hinge_loss(real, fake) == pytest.approx(0.0)  # both beyond the margin
    assert d_hinge_loss(-real, -fake) == pytest.approx(3.0)
    assert g_hinge_loss(fake) == pytest.approx(2.0)


def test_discriminator_takes_images_and_clips() -> None:
    disc = PatchDiscriminator3D(channels=8, layers=2)
    assert disc(torch.zeros(2, 3, 1, 32, 32)).shape[:3] == (2, 1, 1)
    assert disc(torch.zeros(1, 3, 17, 32, 32)).shape[:3] == (1, 1, 17)


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    nll = (3 * w).sum()  # grad (3, 3)
    g = (w * torch.tensor([0.0, 4.0])).sum()  # grad (0, 4)
    expected = torch.tensor([3.0, 3.0]).norm() / (4.0 + 1e-4)
    assert adaptive_weight(nll, g, w) == pytest.approx(float(expected))
    assert adaptive_weight(nll, g * 0, w, max_weight=7.0) == pytest.approx(7.0)


def test_perceptual_off_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_perceptual("") is None
    assert "perceptual loss: OFF" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="VGG16 state dict"):
        load_perceptual("/nonexistent/vgg16.pth")


def test_perceptual_loads_local_vgg16_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    features = vgg16_features()
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    # Same keys as torchvision's vgg16-397923af.pth (whose classifier.* entries are ignored).
    assert set(torchvision_vgg16_keys()) >= {f"features.{k}" for k in features.state_dict()}
    perc = load_perceptual(str(path))
    assert "perceptual loss: ON" in capsys.readouterr().out
    torch.testing.assert_close(perc.features[0].weight, features[0].weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert perc(x, x) == pytest.approx(0.0, abs=1e-6)
    assert perc(x, x.flip(-1)) > 0.01


def torchvision_vgg16_keys() -> list[str]:
    with torch.device("meta"):
        import torchvision

        return list(torchvision.models.vgg16(weights=None).state_dict())
