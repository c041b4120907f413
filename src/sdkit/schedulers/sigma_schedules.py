"""A1111 1.10's schedule types: the noise levels (sigmas) a k-diffusion sampler steps through.

Each function returns n + 1 float32 sigmas from the largest down, ending in 0 (KL Optimal ends at
sigma_min, as in A1111). ``ladder`` is the model's own discrete noise levels (:class:`Ladder`).

| name             | A1111 label      | sigmas                                                                   |
| ---------------- | ---------------- | ------------------------------------------------------------------------ |
| uniform          | Uniform          | the model's ladder at n timesteps evenly spaced from the last to the first |
| karras           | Karras           | uniform in sigma^(1/rho), rho 7 (Karras et al. 2022, arXiv 2206.00364, eq. 5) |
| exponential      | Exponential      | uniform in log sigma                                                     |
| polyexponential  | Polyexponential  | log sigma a power rho (1) of the ramp                                    |
| sgm_uniform      | SGM Uniform      | timesteps spaced between sigma_max's and sigma_min's, the last one left out |
| kl_optimal       | KL Optimal       | uniform in arctan sigma (Sabour et al. 2024, arXiv 2404.14507)           |
| align_your_steps | Align Your Steps | NVIDIA's 10-step SD 1.5 sigmas, log-linearly resampled (Sabour et al. 2024) |
| simple           | Simple           | every (T / n)-th sigma of the ladder from the top                        |
| normal           | Normal           | timesteps spaced between sigma_max's and sigma_min's                     |
| ddim             | DDIM             | the ladder at DDIM's timesteps 1, 1 + T // n, ...                        |
| beta             | Beta             | Beta(alpha, beta) quantiles of the ramp (Lee et al. 2024, arXiv 2407.12173) |
"""

import math

import numpy as np
import torch

SCHEDULE_LABELS = {
    "automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM", "beta": "Beta",
}
SCHEDULE_TYPES = tuple(SCHEDULE_LABELS)
SCHEDULE_ALIASES = {"SGMUniform": "sgm_uniform"}
DEFAULT_RHO = {"karras": 7.0, "polyexponential": 1.0}
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
# Align Your Steps' 10-step schedules (Sabour et al. 2024, arXiv 2404.14507) under the reference's
# names, for ``pipe(timesteps=AysSchedules["StableDiffusionTimesteps"])`` or ``sigmas=``; the SD
# sigmas end at 0, as the reference's do
AysSchedules = {
    "StableDiffusionTimesteps": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24],
    "StableDiffusionSigmas": AYS_SD15[:-1] + [0.0],
    "StableDiffusionXLTimesteps": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13],
    "StableDiffusionXLSigmas": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0],
}


def schedule_type(name):
    """The schedule type key for an A1111 label, key or alias (any case); None if there is none."""
    wanted = str(name).strip().lower()
    for key, label in SCHEDULE_LABELS.items():
        if wanted in (key, label.lower()):
            return key
    return next((v for k, v in SCHEDULE_ALIASES.items() if k.lower() == wanted), None)


def append_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros([1])])


class Ladder:
    """The model's discrete VE noise levels and the continuous timestep of any sigma (k-diffusion DiscreteSchedule).

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for the T training timesteps (Karras et al. 2022,
    Table 1); a sigma between two of them maps to a fractional timestep, linear in log sigma.
    """

    def __init__(self, alphas_cumprod, quantize=False):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (T,), ascending
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def get_sigmas(self, n):
        """n sigmas at timesteps evenly spaced from T - 1 down to 0, then 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma):
        """The (fractional) timestep of each sigma: log-sigma interpolation, or the nearest one if quantized."""
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]  # (T, n)
        if self.quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t):
        """The sigma of each (fractional) timestep, linear in log sigma between training steps."""
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()


def uniform(n, sigma_min, sigma_max, ladder, **_):
    return ladder.get_sigmas(n)


def karras(n, sigma_min, sigma_max, rho=7.0, **_):
    """Karras et al. 2022 (arXiv 2206.00364), eq. 5."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n, sigma_min, sigma_max, **_):
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n, sigma_min, sigma_max, rho=1.0, **_):
    ramp = torch.linspace(1, 0, n) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _ladder_at(ladder, timesteps):
    return torch.FloatTensor([ladder.t_to_sigma(t) for t in timesteps] + [0.0])


def sgm_uniform(n, sigma_min, sigma_max, ladder, **_):
    start, end = ladder.sigma_to_t(torch.tensor(sigma_max)), ladder.sigma_to_t(torch.tensor(sigma_min))
    return _ladder_at(ladder, torch.linspace(start, end, n + 1)[:-1])


def normal(n, sigma_min, sigma_max, ladder, **_):
    start, end = ladder.sigma_to_t(torch.tensor(sigma_max)), ladder.sigma_to_t(torch.tensor(sigma_min))
    return _ladder_at(ladder, torch.linspace(start, end, n))


def kl_optimal(n, sigma_min, sigma_max, **_):
    """Sabour et al. 2024 (arXiv 2404.14507): tan of evenly spaced arctan sigma; ends at sigma_min."""
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    step = torch.arange(n + 1)
    return torch.tan(step / n * alpha_min + (1.0 - step / n) * alpha_max)


def align_your_steps(n, sigma_min, sigma_max, **_):
    """NVIDIA's optimized 10-step SD 1.5 sigmas (Sabour et al. 2024), log-linearly resampled to n."""
    sigmas = list(AYS_SD15)
    if n == len(sigmas):
        return torch.FloatTensor(sigmas + [0.0])
    xs, ys = np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1])
    resampled = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()
    return torch.FloatTensor(np.append(resampled, [0.0]))


def simple(n, sigma_min, sigma_max, ladder, **_):
    step = len(ladder.sigmas) / n
    return torch.FloatTensor([float(ladder.sigmas[-(1 + int(x * step))]) for x in range(n)] + [0.0])


def ddim(n, sigma_min, sigma_max, ladder, **_):
    """The ladder at 1, 1 + T // n, ... (may give a step more or less than n, as in A1111)."""
    step = max(len(ladder.sigmas) // n, 1)
    sigmas = [float(ladder.sigmas[x]) for x in range(1, len(ladder.sigmas), step)]
    return torch.FloatTensor(sigmas[::-1] + [0.0])


def beta_quantiles(n, sigma_min, sigma_max, alpha=0.6, beta=0.6, **_):
    """Lee et al. 2024 (arXiv 2407.12173): sigma_min + Beta(alpha, beta) quantiles * (sigma_max - sigma_min)."""
    from scipy import stats

    quantiles = [stats.beta.ppf(x, alpha, beta) for x in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + x * (sigma_max - sigma_min) for x in quantiles] + [0.0])


SCHEDULES = {
    "uniform": uniform, "karras": karras, "exponential": exponential, "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform, "kl_optimal": kl_optimal, "align_your_steps": align_your_steps,
    "simple": simple, "normal": normal, "ddim": ddim, "beta": beta_quantiles,
}
