"""The noise formulas against the paper's equations (DDeP Eq. 1, 2, 5, 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddep_jax.objectives import denoising


def _arrays(seed=0, shape=(3, 4, 5, 3)):
    rng = np.random.RandomState(seed)
    return (rng.uniform(-1, 1, shape).astype(np.float32),
            rng.randn(*shape).astype(np.float32))


def test_scaled_noise_matches_eq5_both_forms():
    x, eps = _arrays()
    sigma = np.array([0.0, 0.22, 0.8], np.float32)
    got = np.asarray(denoising.add_noise(x, eps, sigma, "scaled"))
    s = sigma[:, None, None, None]
    gamma = 1.0 / (1.0 + s**2)
    np.testing.assert_allclose(got, np.sqrt(gamma) * x + np.sqrt(1 - gamma) * eps,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, (x + s * eps) / np.sqrt(1 + s**2),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[0], x[0])  # sigma = 0 leaves x unchanged


def test_simple_noise_matches_eq1():
    x, eps = _arrays(1)
    got = denoising.add_noise(x, eps, 0.5, "simple")
    np.testing.assert_allclose(got, x + 0.5 * eps, rtol=1e-6)


@pytest.mark.parametrize("noise_type", ["scaled", "simple"])
def test_estimate_clean_inverts_with_true_eps(noise_type):
    x, eps = _arrays(2)
    sigma = jnp.array([0.1, 0.22, 1.0])
    noisy = denoising.add_noise(x, eps, sigma, noise_type)
    np.testing.assert_allclose(denoising.estimate_clean(noisy, eps, sigma, noise_type),
                               x, atol=1e-5)


def test_gamma_from_sigma():
    np.testing.assert_allclose(denoising.gamma_from_sigma(0.22), 1 / (1 + 0.22**2))


def test_loss_targets_eq6_and_eq2():
    x, eps = _arrays(3)
    pred = np.zeros_like(x)
    np.testing.assert_allclose(denoising.denoising_loss(pred, x, eps, "eps"),
                               np.mean(eps**2), rtol=1e-6)
    np.testing.assert_allclose(denoising.denoising_loss(pred, x, eps, "x"),
                               np.mean(x**2), rtol=1e-6)
    assert float(denoising.denoising_loss(eps, x, eps, "eps")) == 0.0


def test_sample_sigma_fixed_and_range():
    fixed = denoising.sample_sigma(jax.random.key(0), 4, 0.22, None)
    np.testing.assert_allclose(fixed, [0.22] * 4)
    drawn = np.asarray(denoising.sample_sigma(jax.random.key(0), 1000, 0.22, (0.1, 0.5)))
    assert drawn.min() >= 0.1 and drawn.max() <= 0.5 and drawn.std() > 0.05


def test_unknown_noise_type_and_target():
    x, eps = _arrays()
    with pytest.raises(ValueError, match="noise_type"):
        denoising.add_noise(x, eps, 0.2, "pink")
    with pytest.raises(ValueError, match="target"):
        denoising.denoising_loss(x, x, eps, "v")


def test_table4_gamma_interval_is_sampled_as_gamma():
    """Table 4's caption samples gamma in [0.9, 0.95], i.e. sigma in
    [0.229, 0.333] (not sigma in [0, 0.5])."""
    sigma = np.asarray(denoising.sample_sigma(jax.random.key(0), 4000, 0.22, None,
                                              (0.9, 0.95)))
    gamma = 1 / (1 + sigma.astype(np.float64) ** 2)
    assert gamma.min() >= 0.9 - 1e-6 and gamma.max() <= 0.95 + 1e-6
    assert abs(gamma.mean() - 0.925) < 0.002  # uniform in gamma
    np.testing.assert_allclose([sigma.min(), sigma.max()],
                               [np.sqrt(1 / 0.95 - 1), np.sqrt(1 / 0.9 - 1)], atol=2e-3)
    with pytest.raises(ValueError, match="not both"):
        denoising.sample_sigma(jax.random.key(0), 4, 0.22, (0.0, 0.5), (0.9, 0.95))


def test_ddpm_gamma_interval_stays_finite():
    sigma = np.asarray(denoising.sample_sigma(jax.random.key(1), 4000, 0.22, None,
                                              (0.0, 1.0)))
    assert np.all(np.isfinite(sigma)) and sigma.min() >= 0
    assert sigma.max() <= denoising.sigma_from_gamma(denoising.GAMMA_FLOOR) + 1e-3
    x, eps = _arrays(4, (4000, 1, 1, 3))
    noisy = np.asarray(denoising.add_noise(x, eps, sigma, "scaled"))
    assert np.all(np.isfinite(noisy))


def test_corrupt_reads_gamma_range():
    import ml_collections

    d = ml_collections.ConfigDict(dict(noise_type="scaled", sigma=0.22, sigma_range=(),
                                       gamma_range=(0.9, 0.95)))
    images = np.zeros((64, 4, 4, 3), np.uint8)
    _, _, sigma, _ = denoising.corrupt(d, images, jax.random.key(0))
    gamma = 1 / (1 + np.asarray(sigma) ** 2)
    assert gamma.min() >= 0.9 - 1e-6 and gamma.max() <= 0.95 + 1e-6
