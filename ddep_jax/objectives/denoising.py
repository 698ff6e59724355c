"""The denoising objectives of DDeP (Brempong et al. 2022, Sec. 3-4).

Notation: x clean image (float, [-1, 1]), eps ~ N(0, I), sigma >= 0 the
noise magnitude, gamma = 1 / (1 + sigma^2).

- Simple additive noise, Eq. 1:  x~ = x + sigma * eps.
- Scaled additive noise, Eq. 5:  x~ = sqrt(gamma) x + sqrt(1 - gamma) eps
                                    = (x + sigma eps) / sqrt(1 + sigma^2).
- Target: eps (Eq. 3, 4, 6; the paper's choice) or x (Eq. 2).
- Loss: mean squared error over all pixels and channels.

No clipping of noisy pixels (Fig. 4 caption).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddep_jax.models import to_float_images

NOISE_TYPES = ("scaled", "simple")
TARGETS = ("eps", "x")


def gamma_from_sigma(sigma: jax.Array) -> jax.Array:
    """gamma = 1 / (1 + sigma^2) (Sec. 4.2, below Eq. 5)."""
    return 1.0 / (1.0 + jnp.square(sigma))


def add_noise(x: jax.Array, eps: jax.Array, sigma: jax.Array,
              noise_type: str = "scaled") -> jax.Array:
    """Corrupts clean images.

    Args:
      x: float32 [B, H, W, C] clean images in [-1, 1].
      eps: float32 [B, H, W, C] standard normal noise.
      sigma: float32 scalar or [B] noise magnitude per example.
      noise_type: 'scaled' (Eq. 5) or 'simple' (Eq. 1).

    Returns:
      float32 [B, H, W, C] noisy images x~ (not clipped).

    Raises:
      ValueError: unknown noise_type.
    """
    sigma = jnp.reshape(jnp.asarray(sigma, x.dtype), (-1, 1, 1, 1))
    if noise_type == "scaled":
        gamma = gamma_from_sigma(sigma)
        return jnp.sqrt(gamma) * x + jnp.sqrt(1.0 - gamma) * eps
    if noise_type == "simple":
        return x + sigma * eps
    raise ValueError(f"noise_type={noise_type!r}: expected one of {NOISE_TYPES}.")


def estimate_clean(noisy: jax.Array, eps_hat: jax.Array, sigma: jax.Array,
                   noise_type: str = "scaled") -> jax.Array:
    """Inverts `add_noise` with a predicted eps: the denoised image x^.

    Scaled: x^ = (x~ - sqrt(1 - gamma) eps^) / sqrt(gamma).
    Simple: x^ = x~ - sigma eps^.
    Shapes as in `add_noise`.
    """
    sigma = jnp.reshape(jnp.asarray(sigma, noisy.dtype), (-1, 1, 1, 1))
    if noise_type == "scaled":
        gamma = gamma_from_sigma(sigma)
        return (noisy - jnp.sqrt(1.0 - gamma) * eps_hat) / jnp.sqrt(gamma)
    if noise_type == "simple":
        return noisy - sigma * eps_hat
    raise ValueError(f"noise_type={noise_type!r}: expected one of {NOISE_TYPES}.")


GAMMA_FLOOR = 1e-4
"""The smallest gamma `sample_sigma` draws (sigma = sqrt(1 / gamma - 1) at
most ~100): DDPM's interval [0, 1] includes gamma = 0, pure noise, whose
sigma is infinite."""


def sigma_from_gamma(gamma: jax.Array) -> jax.Array:
    """sigma = sqrt(1 / gamma - 1), the inverse of `gamma_from_sigma`."""
    return jnp.sqrt(1.0 / gamma - 1.0)


def sample_sigma(key: jax.Array, batch_size: int, sigma: float,
                 sigma_range: tuple[float, float] | None,
                 gamma_range: tuple[float, float] | None = None) -> jax.Array:
    """Noise magnitudes for a batch: fixed (paper default), or per example.

    Args:
      key: PRNG key.
      batch_size: B.
      sigma: the fixed value (0.22 is the paper's best for scaled noise, Fig. 5).
      sigma_range: (low, high) to sample sigma uniformly per example instead,
        or None.
      gamma_range: (low, high) to sample gamma = 1 / (1 + sigma^2) uniformly
        per example instead, or None. Table 4's caption samples gamma in
        [0.9, 0.95] (sigma in [0.229, 0.333]); DDPM (Ho et al. 2020), which
        the text mentions, draws gamma in [0, 1]. Gamma is clipped to
        [`GAMMA_FLOOR`, 1].

    Returns:
      float32 [B] sigma.

    Raises:
      ValueError: both ranges given.
    """
    if sigma_range is not None and gamma_range is not None:
        raise ValueError(f"sigma_range={sigma_range} and gamma_range={gamma_range}: "
                         "sample one of sigma or gamma, not both.")
    if gamma_range is not None:
        low, high = gamma_range
        gamma = jax.random.uniform(key, (batch_size,), jnp.float32, low, high)
        return sigma_from_gamma(jnp.clip(gamma, GAMMA_FLOOR, 1.0))
    if sigma_range is None:
        return jnp.full((batch_size,), sigma, jnp.float32)
    low, high = sigma_range
    return jax.random.uniform(key, (batch_size,), jnp.float32, low, high)


def denoising_loss(prediction: jax.Array, x: jax.Array, eps: jax.Array,
                   target: str = "eps") -> jax.Array:
    """Mean squared error of the prediction against eps (Eq. 6) or x (Eq. 2).

    Args:
      prediction: float32 [B, H, W, C] network output.
      x, eps: float32 [B, H, W, C] the clean image and the noise that was added.
      target: 'eps' or 'x'.

    Returns:
      float32 scalar; 1.0 for predicting zeros against unit-variance eps.
    """
    if target == "eps":
        ref = eps
    elif target == "x":
        ref = x
    else:
        raise ValueError(f"target={target!r}: expected one of {TARGETS}.")
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - ref))


def corrupt(denoising_config, images: jax.Array, key: jax.Array):
    """Draws sigma and eps for a batch and forms the noisy input (Eq. 1 or 5).

    Args:
      denoising_config: `config.denoising` (noise_type, sigma, sigma_range,
        gamma_range).
      images: uint8 [B, H, W, 3].
      key: PRNG key (split into sigma's and eps's).

    Returns:
      (x, eps, sigma [B], noisy), float32; x and noisy [B, H, W, 3].
    """
    d = denoising_config
    k_sigma, k_eps = jax.random.split(key)
    x = to_float_images(images)
    sigma = sample_sigma(k_sigma, x.shape[0], d.sigma, tuple(d.sigma_range) or None,
                         tuple(d.get("gamma_range", ())) or None)
    eps = jax.random.normal(k_eps, x.shape, jnp.float32)
    return x, eps, sigma, add_noise(x, eps, sigma, d.noise_type)
