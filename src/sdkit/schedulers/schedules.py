"""Shared maths of every sdkit scheduler: noise schedules, timestep spacings, sigma conversions.

Notation (DDPM, Ho et al. 2020; VE/VP view, Karras et al. 2022):

| symbol      | meaning                                                   |
| ----------- | --------------------------------------------------------- |
| beta        | per-step noise variance of the forward process            |
| alpha_bar   | cumulative product of (1 - beta): x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps |
| sigma       | VE noise level sqrt((1 - alpha_bar) / alpha_bar) |
| alpha, sigma_t | VP coefficients recovered from sigma: x_t = alpha x0 + sigma_t eps |

Precision follows the reference implementation (diffusers): schedules are built in float32 on
the CPU, step coefficients are float32 0-dim tensors, and the sample keeps its own dtype.
"""

import math

import numpy as np
import torch

from ..configuration import check_value
from ..noise import SeedNoise

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def cosine_betas(num_train_timesteps, max_beta=0.999):
    """Betas of the cosine alpha_bar schedule (Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 17)."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def sigmoid_betas(num_train_timesteps, beta_start, beta_end):
    """Sigmoid-shaped betas on [-6, 6], as the reference defines "sigmoid" (GeoDiff, arXiv 2203.02923).

    Not the sigmoid schedule of Jabri et al. (arXiv 2212.11972), which shapes alpha_bar(t) itself.
    """
    s = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float32))
    return s * (beta_end - beta_start) + beta_start


def make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas=None,
               dtype=torch.float32):
    """Beta schedule by name, float32 (linear/scaled_linear: Ho et al. 2020, Rombach et al. 2022).

    ``dtype=torch.float64`` computes the linear schedules in double precision, as CompVis does.
    """
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=dtype)
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=dtype)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=dtype) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(n).to(dtype)
    if beta_schedule == "sigmoid":
        return sigmoid_betas(n, beta_start, beta_end).to(dtype)
    check_value("make_betas", "beta_schedule", beta_schedule, BETA_SCHEDULES)


def rescale_zero_terminal_snr(betas):
    """Rescale sqrt(alpha_bar) to zero terminal SNR (Lin et al. 2023, arXiv 2305.08891, Alg. 1)."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_alphas_cumprod(config, clamp_terminal=False):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for a scheduler config dataclass (Ho et al. 2020, eq. 4).

    With zero terminal SNR, ``clamp_terminal`` keeps the last alpha_bar at 2**-24 so that the
    VE sigma stays finite (what the reference's sigma-based samplers do).
    """
    betas = make_betas(
        config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end,
        config.trained_betas,
    )
    zero_snr = getattr(config, "rescale_betas_zero_snr", False)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if clamp_terminal and zero_snr:
        alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def spaced_timesteps(spacing, num_inference_steps, num_train_timesteps, steps_offset=0,
                     end=None, extra_point=False):
    """Descending float64 timesteps for a spacing rule (Lin et al. 2023, arXiv 2305.08891, Table 2).

    ``end`` limits the usable range (default: all training timesteps); ``extra_point`` spaces
    n + 1 points and drops the final one (how DPM-Solver leaves out t = 0).
    """
    n = num_inference_steps
    end = num_train_timesteps if end is None else end
    m = n + 1 if extra_point else n
    if spacing == "linspace":
        t = np.linspace(0, end - 1, m)[::-1]
    elif spacing == "leading":
        t = (np.arange(0, m) * (end // m)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        return np.round(np.arange(end, 0, -num_train_timesteps / n)) - 1
    else:
        check_value("spaced_timesteps", "timestep_spacing", spacing, TIMESTEP_SPACINGS)
    return t[:n].copy() if extra_point else t.copy()


def check_num_steps(num_inference_steps, num_train_timesteps, owner):
    """Reject step counts that are not a positive int no larger than the training timesteps."""
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"{owner}: num_inference_steps must be a positive integer, got {n!r}.")
    if n > num_train_timesteps:
        raise ValueError(
            f"{owner}: num_inference_steps={n} is more than the {num_train_timesteps} timesteps "
            "the model was trained with; use at most that many steps."
        )


def vp_to_ve_sigmas(alphas_cumprod):
    """VE sigma = sqrt((1 - alpha_bar) / alpha_bar) of a VP schedule (Karras et al. 2022, Table 1)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    """Noise levels spaced uniformly in sigma^(1/rho) (Karras et al. 2022, arXiv 2206.00364, eq. 5)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma, log_sigmas):
    """Fractional training timestep of a sigma, linear in log sigma (Karras et al. 2022, 2206.00364)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def interp_sigmas(timesteps, train_sigmas):
    """VE sigma at fractional timesteps, linear in t between training steps (Karras et al. 2022)."""
    train_sigmas = np.array(train_sigmas)
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def sampler_sigmas(config, alphas_cumprod, num_inference_steps, sigma_min=None, sigma_max=None):
    """(float32 timesteps, float64 sigmas) of the sigma samplers, optionally Karras (2206.00364)."""
    n = num_inference_steps
    timesteps = spaced_timesteps(
        config.timestep_spacing, n, config.num_train_timesteps, config.steps_offset
    ).astype(np.float32)
    train_sigmas = np.array(vp_to_ve_sigmas(alphas_cumprod))
    sigmas = interp_sigmas(timesteps, train_sigmas)
    if getattr(config, "use_karras_sigmas", False):
        sigma_min = sigma_min if sigma_min is not None else sigmas[-1].item()
        sigma_max = sigma_max if sigma_max is not None else sigmas[0].item()
        sigmas = karras_sigmas(sigma_min, sigma_max, n)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
    return torch.from_numpy(timesteps), sigmas


def ve_to_vp(sigma):
    """(alpha, sigma_t) = (1, sigma) / sqrt(1 + sigma^2), VE to VP (Karras et al. 2022, 2206.00364)."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def vp_prediction_to_x0_eps(model_output, x, alpha, sigma_t, prediction_type):
    """(x0, eps) for x = alpha x0 + sigma_t eps (Ho et al. 2020; v: Salimans & Ho 2022, 2202.00512)."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x - sigma_t * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * x - sigma_t * model_output
        eps = alpha * model_output + sigma_t * x
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - alpha * x0) / sigma_t
    else:
        check_value("scheduler", "prediction_type", prediction_type, PREDICTION_TYPES)
    return x0, eps


def ve_prediction_to_x0(model_output, x, sigma, prediction_type):
    """x0 for the VE sample x = x0 + sigma eps (Karras et al. 2022, arXiv 2206.00364, Sec. 5)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    check_value("scheduler", "prediction_type", prediction_type, PREDICTION_TYPES)


def per_sample(values, like):
    """Reshape a (B,) coefficient to (B, 1, ..., 1) so it broadcasts over ``like``."""
    values = values.flatten()
    return values.reshape(values.shape + (1,) * (like.dim() - 1))


def randn(shape, generator=None, device=None, dtype=None):
    """Standard normal noise drawn like the reference: one generator, or one per batch item.

    An A1111 :class:`~sdkit.noise.SeedNoise` draws each image's next noise from its own seed.
    """
    if isinstance(generator, SeedNoise):
        return generator.randn(shape, device, dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(
                    f"Cannot draw {device} noise from a {gen_type} generator; "
                    "pass a CPU generator or one on the sample's device."
                )
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per item."
            )
        one = (1,) + tuple(shape[1:])
        noise = torch.cat(
            [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        )
    else:
        noise = torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype)
    return noise.to(device)
