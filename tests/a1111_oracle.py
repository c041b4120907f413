"""A1111 1.10's behaviour, transcribed for the tests as the oracle where no installed package has it.

Each piece names the A1111 file it is written from (AUTOMATIC1111/stable-diffusion-webui at
v1.10.1, modules/). k-diffusion itself comes from tests/oracles.py.
"""

import numpy as np
import torch
from oracles import k_diffusion

sampling, external = k_diffusion()

# A1111 1.10's table: name -> (k-diffusion function, default schedule, options)
A1111 = {
    "DPM++ 2M": ("sample_dpmpp_2m", "karras", {}),
    "DPM++ SDE": ("sample_dpmpp_sde", "karras", {"brownian": True}),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "exponential", {"brownian": True}),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", "exponential", {"brownian": True, "solver_type": "heun"}),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "karras", {}),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "exponential", {"discard": True, "brownian": True}),
    "Euler a": ("sample_euler_ancestral", None, {}),
    "Euler": ("sample_euler", None, {}),
    "LMS": ("sample_lms", None, {}),
    "Heun": ("sample_heun", None, {}),
    "DPM2": ("sample_dpm_2", "karras", {"discard": True}),
    "DPM2 a": ("sample_dpm_2_ancestral", "karras", {"discard": True}),
}


def ldm_alphas_cumprod(config):
    """alpha_bar as CompVis LDM's register_schedule makes it, then A1111's "Zero Terminal SNR" override."""
    n = config["num_train_timesteps"]
    start, end = config["beta_start"], config["beta_end"]
    if config["beta_schedule"] == "scaled_linear":
        betas = (torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2).numpy()
    else:
        betas = torch.linspace(start, end, n, dtype=torch.float64).numpy()
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)
    if config.get("rescale_betas_zero_snr"):  # A1111 modules/sd_models.py rescale_zero_terminal_snr_abar
        alphas_bar_sqrt = alphas_cumprod.sqrt()
        alphas_bar_sqrt_0, alphas_bar_sqrt_T = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
        alphas_bar_sqrt -= alphas_bar_sqrt_T
        alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
        alphas_cumprod = alphas_bar_sqrt**2
        alphas_cumprod[-1] = 4.8973451890853435e-08
    return alphas_cumprod


class CompVisModel(torch.nn.Module):
    """What k-diffusion's CompVis wrappers need of a model: alphas_cumprod and apply_model."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet, self.alphas_cumprod = unet, alphas_cumprod

    def apply_model(self, x, t, cond):
        return self.unet(x, t, cond)


def slerp(val, low, high):
    """modules/rng.py slerp (along dim 1 of a (C, H, W) noise)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class ImageRNG:
    """modules/rng.py ImageRNG with the CPU source: a generator per image seed, ENSD after the first draw."""

    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0,
                 ensd=0):
        self.shape, self.seeds, self.subseeds, self.subseed_strength = tuple(shape), seeds, subseeds, subseed_strength
        self.seed_resize_from_h, self.seed_resize_from_w, self.ensd = seed_resize_from_h, seed_resize_from_w, ensd
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.is_first = True

    @staticmethod
    def randn(seed, shape, generator=None):
        return torch.randn(shape, generator=generator or torch.Generator().manual_seed(seed))

    def first(self):
        noise_shape = self.shape if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0 else (
            self.shape[0], int(self.seed_resize_from_h) // 8, int(self.seed_resize_from_w // 8))
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = 0 if i >= len(self.subseeds) else self.subseeds[i]
                subnoise = self.randn(subseed, noise_shape)
            if noise_shape != self.shape:
                noise = self.randn(seed, noise_shape)
            else:
                noise = self.randn(seed, self.shape, generator=generator)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if noise_shape != self.shape:
                x = self.randn(seed, self.shape, generator=generator)
                dx, dy = (self.shape[2] - noise_shape[2]) // 2, (self.shape[1] - noise_shape[1]) // 2
                w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
                h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
                tx, ty = 0 if dx < 0 else dx, 0 if dy < 0 else dy
                dx, dy = max(-dx, 0), max(-dy, 0)
                x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
                noise = x
            xs.append(noise)
        if self.ensd:
            self.generators = [torch.Generator().manual_seed(seed + self.ensd) for seed in self.seeds]
        return torch.stack(xs)

    def next(self):
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


class TorchHijack:
    """A1111's sd_samplers_common.TorchHijack: k-diffusion's torch.randn_like draws from the ImageRNG."""

    def __init__(self, rng):
        self.rng = rng

    def __getattr__(self, item):
        if item == "randn_like":
            return lambda x: self.rng.next()
        return getattr(torch, item)


def a1111_sigmas(denoiser, name, steps, schedule="Automatic"):
    """A1111's KDiffusionSampler.get_sigmas for the schedules k-diffusion has."""
    _, default, opts = A1111[name]
    steps += 1 if opts.get("discard") else 0
    chosen = default if schedule == "Automatic" else schedule.lower()
    sigma_min, sigma_max = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    if chosen is None:
        sigmas = denoiser.get_sigmas(steps)
    else:
        sigmas = getattr(sampling, f"get_sigmas_{chosen}")(n=steps, sigma_min=sigma_min, sigma_max=sigma_max)
    if opts.get("discard"):
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def a1111_ddim(model, x, timesteps, alphas_cumprod, eta, randn_like):
    """modules/sd_samplers_timesteps_impl.py ddim."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * np.sqrt((1 - alphas_prev.numpy()) / (1 - alphas.numpy()) * (1 - alphas.numpy() / alphas_prev.numpy()))
    s_in, s_x = x.new_ones((x.shape[0])), x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        sigma_t, sqrt_one_minus_at = sigmas[index].item() * s_x, sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * randn_like(x)
    return x


def a1111_plms(model, x, timesteps, alphas_cumprod):
    """modules/sd_samplers_timesteps_impl.py plms."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in, s_x, old_eps = x.new_ones([x.shape[0]]), x.new_ones((x.shape[0], 1, 1, 1)), []

    def get_x_prev_and_pred_x0(e_t, index):
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t, pred_x0

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        if len(old_eps) == 0:
            x_prev, _ = get_x_prev_and_pred_x0(e_t, index)
            e_t_prime = (e_t + model(x_prev, timesteps[max(index - 1, 0)].item() * s_in)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, _ = get_x_prev_and_pred_x0(e_t_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
    return x


def a1111_restart(model, x, sigmas, randn_like, s_noise=1.0):
    """modules/sd_samplers_extra.py restart_sampler (restart_list None)."""
    s_in = x.new_ones([x.shape[0]])

    def heun_step(x, old_sigma, new_sigma):
        denoised = model(x, old_sigma * s_in)
        d, dt = sampling.to_d(x, old_sigma, denoised), new_sigma - old_sigma
        if new_sigma == 0:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = sampling.to_d(x_2, new_sigma, model(x_2, new_sigma * s_in))
        return x + (d + d_2) / 2 * dt

    steps, restart_list = sigmas.shape[0] - 1, {}
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = sampling.get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
        restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = sampling.get_sigmas_karras(restart_steps, sigmas[min_idx].item(),
                                                           sigmas[max_idx].item())[:-1]
                step_list.extend(list(zip(sigma_restart[:-1], sigma_restart[1:])) * restart_times)
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is not None and last_sigma < old_sigma:
            x = x + randn_like(x) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x


# -- modules/sd_schedulers.py (inner_model: k-diffusion's CompVisDenoiser) -------------------------

def sgm_uniform(n, sigma_min, sigma_max, inner_model):
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    sigs = [inner_model.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]]
    return torch.FloatTensor(sigs + [0.0])


def normal_scheduler(n, sigma_min, sigma_max, inner_model):
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    return torch.FloatTensor([inner_model.t_to_sigma(ts) for ts in torch.linspace(start, end, n)] + [0.0])


def simple_scheduler(n, sigma_min, sigma_max, inner_model):
    ss = len(inner_model.sigmas) / n
    return torch.FloatTensor([float(inner_model.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])


def ddim_scheduler(n, sigma_min, sigma_max, inner_model):
    sigs, ss, x = [], max(len(inner_model.sigmas) // n, 1), 1
    while x < len(inner_model.sigmas):
        sigs += [float(inner_model.sigmas[x])]
        x += ss
    return torch.FloatTensor(sigs[::-1] + [0.0])


def beta_scheduler(n, sigma_min, sigma_max, alpha=0.6, beta=0.6):
    from scipy import stats

    timesteps = [stats.beta.ppf(x, alpha, beta) for x in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + (x * (sigma_max - sigma_min)) for x in timesteps] + [0.0])


def kl_optimal(n, sigma_min, sigma_max):
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    step_indices = torch.arange(n + 1)
    return torch.tan(step_indices / n * alpha_min + (1.0 - step_indices / n) * alpha_max)


def align_your_steps(n):
    """get_align_your_steps_sigmas for an SD 1.x model."""
    sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    if n != len(sigmas):
        xs, ys = np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1])
        sigmas = np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy(), [0.0])
    else:
        sigmas.append(0.0)
    return torch.FloatTensor(sigmas)


# -- modules/models/diffusion/uni_pc/uni_pc.py (discrete schedule, multistep, B(h) variants) and sd_samplers_timesteps_impl.unipc

def interpolate_fn(x, xp, yp):
    N, K = x.shape[0], xp.shape[1]
    all_x = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((N, 1, 1))], dim=2)
    sorted_all_x, x_indices = torch.sort(all_x, dim=2)
    x_idx = torch.argmin(x_indices, dim=2)
    cand_start_idx = x_idx - 1
    start_idx = torch.where(torch.eq(x_idx, 0), torch.tensor(1),
                            torch.where(torch.eq(x_idx, K), torch.tensor(K - 2), cand_start_idx))
    end_idx = torch.where(torch.eq(start_idx, cand_start_idx), start_idx + 2, start_idx + 1)
    start_x = torch.gather(sorted_all_x, dim=2, index=start_idx.unsqueeze(2)).squeeze(2)
    end_x = torch.gather(sorted_all_x, dim=2, index=end_idx.unsqueeze(2)).squeeze(2)
    start_idx2 = torch.where(torch.eq(x_idx, 0), torch.tensor(0),
                             torch.where(torch.eq(x_idx, K), torch.tensor(K - 2), cand_start_idx))
    y_positions_expanded = yp.unsqueeze(0).expand(N, -1, -1)
    start_y = torch.gather(y_positions_expanded, dim=2, index=start_idx2.unsqueeze(2)).squeeze(2)
    end_y = torch.gather(y_positions_expanded, dim=2, index=(start_idx2 + 1).unsqueeze(2)).squeeze(2)
    return start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)


class NoiseScheduleVP:
    def __init__(self, alphas_cumprod):
        log_alphas = 0.5 * torch.log(alphas_cumprod)
        self.total_N, self.T = len(log_alphas), 1.0
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:].reshape((1, -1))
        self.log_alpha_array = log_alphas.reshape((1, -1))

    def marginal_log_mean_coeff(self, t):
        return interpolate_fn(t.reshape((-1, 1)), self.t_array, self.log_alpha_array).reshape((-1))

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        return log_mean_coeff - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean_coeff))

    def inverse_lambda(self, lamb):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,)), -2.0 * lamb)
        t = interpolate_fn(log_alpha.reshape((-1, 1)), torch.flip(self.log_alpha_array, [1]),
                           torch.flip(self.t_array, [1]))
        return t.reshape((-1,))


def expand_dims(v, dims):
    return v[(...,) + (None,) * (dims - 1)]


class UniPC:
    """UniPC with predict_x0=True, no thresholding, as A1111's UniPCCFG (model called at (t - 1/N) * 1000)."""

    def __init__(self, eps_model, noise_schedule, variant="bh1"):
        self.eps_model, self.noise_schedule, self.variant = eps_model, noise_schedule, variant

    def model_fn(self, x, t):
        noise = self.eps_model(x, (t - 1.0 / self.noise_schedule.total_N) * 1000.0)
        alpha_t, sigma_t = self.noise_schedule.marginal_alpha(t), self.noise_schedule.marginal_std(t)
        return (x - expand_dims(sigma_t, x.dim()) * noise) / expand_dims(alpha_t, x.dim())

    def get_time_steps(self, skip_type, t_T, t_0, N):
        if skip_type == "logSNR":
            lambda_T = self.noise_schedule.marginal_lambda(torch.tensor(t_T))
            lambda_0 = self.noise_schedule.marginal_lambda(torch.tensor(t_0))
            return self.noise_schedule.inverse_lambda(torch.linspace(lambda_T.cpu().item(), lambda_0.cpu().item(), N + 1))
        if skip_type == "time_uniform":
            return torch.linspace(t_T, t_0, N + 1)
        return torch.linspace(t_T ** (1.0 / 2), t_0 ** (1.0 / 2), N + 1).pow(2)

    def multistep_uni_pc_bh_update(self, x, model_prev_list, t_prev_list, t, order, x_t=None, use_corrector=True):
        ns, dims = self.noise_schedule, x.dim()
        t_prev_0 = t_prev_list[-1]
        lambda_prev_0, lambda_t = ns.marginal_lambda(t_prev_0), ns.marginal_lambda(t)
        model_prev_0 = model_prev_list[-1]
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)
        alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
        h = lambda_t - lambda_prev_0
        rks, D1s = [], []
        for i in range(1, order):
            t_prev_i, model_prev_i = t_prev_list[-(i + 1)], model_prev_list[-(i + 1)]
            rk = ((ns.marginal_lambda(t_prev_i) - lambda_prev_0) / h)[0]
            rks.append(rk)
            D1s.append((model_prev_i - model_prev_0) / rk)
        rks.append(1.0)
        rks = torch.tensor(rks)
        R, b = [], []
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.variant == "bh1" else torch.expm1(hh)
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= (i + 1)
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R, b = torch.stack(R), torch.tensor(b)
        use_predictor = len(D1s) > 0 and x_t is None
        if len(D1s) > 0:
            D1s = torch.stack(D1s, dim=1)
            if x_t is None:
                rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            D1s = None
        if use_corrector:
            rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
        model_t = None
        x_t_ = expand_dims(sigma_t / sigma_prev_0, dims) * x - expand_dims(alpha_t * h_phi_1, dims) * model_prev_0
        if x_t is None:
            pred_res = torch.einsum("k,bkchw->bchw", rhos_p, D1s) if use_predictor else 0
            x_t = x_t_ - expand_dims(alpha_t * B_h, dims) * pred_res
        if use_corrector:
            model_t = self.model_fn(x_t, t)
            corr_res = torch.einsum("k,bkchw->bchw", rhos_c[:-1], D1s) if D1s is not None else 0
            D1_t = model_t - model_prev_0
            x_t = x_t_ - expand_dims(alpha_t * B_h, dims) * (corr_res + rhos_c[-1] * D1_t)
        return x_t, model_t

    def sample(self, x, steps, t_start=None, order=3, skip_type="time_uniform", lower_order_final=True):
        t_0 = 1.0 / self.noise_schedule.total_N
        t_T = self.noise_schedule.T if t_start is None else t_start
        timesteps = self.get_time_steps(skip_type, t_T, t_0, steps)
        vec_t = timesteps[0].expand((x.shape[0]))
        model_prev_list, t_prev_list = [self.model_fn(x, vec_t)], [vec_t]
        for init_order in range(1, order):
            vec_t = timesteps[init_order].expand(x.shape[0])
            x, model_x = self.multistep_uni_pc_bh_update(x, model_prev_list, t_prev_list, vec_t, init_order)
            model_prev_list.append(model_x)
            t_prev_list.append(vec_t)
        for step in range(order, steps + 1):
            vec_t = timesteps[step].expand(x.shape[0])
            step_order = min(order, steps + 1 - step) if lower_order_final else order
            x, model_x = self.multistep_uni_pc_bh_update(x, model_prev_list, t_prev_list, vec_t, step_order,
                                                         use_corrector=step != steps)
            for i in range(order - 1):
                t_prev_list[i], model_prev_list[i] = t_prev_list[i + 1], model_prev_list[i + 1]
            t_prev_list[-1] = vec_t
            if step < steps:
                model_prev_list[-1] = model_x
        return x
