"""cxr.model.ddpm against diffusers' DDPMScheduler and the Min-SNR formula."""

import pytest
import torch

from cxr.model import ddpm
from cxr.model.tiny import SD15_SCHEDULER_CONFIG

CONFIGS = {
    "sd15": dict(SD15_SCHEDULER_CONFIG),
    "linear": dict(SD15_SCHEDULER_CONFIG, beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine": dict(SD15_SCHEDULER_CONFIG, beta_schedule="squaredcos_cap_v2"),
}


def _diffusers_scheduler(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)


def _inputs(seed=0, batch=8):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 8, 8, generator=gen)
    noise = torch.randn(batch, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([0, 1, 10, 250, 500, 750, 998, 999])[:batch]
    return x0, noise, timesteps


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_match_diffusers(name):
    reference = _diffusers_scheduler(CONFIGS[name])
    schedule = ddpm.make_schedule(CONFIGS[name])
    assert schedule.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_add_noise_and_velocity_match_diffusers(name):
    reference = _diffusers_scheduler(CONFIGS[name])
    schedule = ddpm.make_schedule(CONFIGS[name])
    x0, noise, timesteps = _inputs()
    torch.testing.assert_close(
        ddpm.add_noise(x0, noise, timesteps, schedule), reference.add_noise(x0, noise, timesteps), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        ddpm.velocity(x0, noise, timesteps, schedule),
        reference.get_velocity(x0, noise, timesteps),
        rtol=1e-5,
        atol=1e-5,
    )


def test_training_target_by_prediction_type():
    x0, noise, timesteps = _inputs()
    eps = ddpm.make_schedule(CONFIGS["sd15"])
    v = ddpm.make_schedule(CONFIGS["sd15"], prediction_type="v_prediction")
    assert eps.prediction_type == "epsilon"  # the config's default
    assert torch.equal(ddpm.training_target(x0, noise, timesteps, eps), noise)
    reference = _diffusers_scheduler(CONFIGS["sd15"])
    torch.testing.assert_close(
        ddpm.training_target(x0, noise, timesteps, v),
        reference.get_velocity(x0, noise, timesteps),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_schedule_and_prediction_type_are_clear_errors():
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
        ddpm.make_schedule(dict(SD15_SCHEDULER_CONFIG, beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="--prediction_type"):
        ddpm.make_schedule(CONFIGS["sd15"], prediction_type="sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_training_recipe(prediction_type):
    from diffusers.training_utils import compute_snr

    reference = _diffusers_scheduler(CONFIGS["sd15"])
    schedule = ddpm.make_schedule(CONFIGS["sd15"], prediction_type=prediction_type)
    timesteps = torch.arange(0, 1000, 7)
    gamma = 5.0
    snr = compute_snr(reference, timesteps)
    torch.testing.assert_close(schedule.snr[timesteps], snr, rtol=1e-4, atol=1e-6)
    # diffusers' train_text_to_image.py: min(snr, gamma) / snr for epsilon, / (snr + 1) for v.
    expected = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    expected = expected / (snr + 1) if prediction_type == "v_prediction" else expected / snr
    weights = ddpm.min_snr_weights(schedule.snr[timesteps], gamma, prediction_type)
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-6)
    # Closed form at one point: t with snr >= gamma gets gamma / snr (eps).
    low_noise = schedule.snr[0]
    assert low_noise > gamma
    if prediction_type == "epsilon":
        torch.testing.assert_close(ddpm.min_snr_weights(low_noise, gamma, prediction_type), gamma / low_noise)


def test_per_sample_and_offset_noise_broadcast():
    values = torch.tensor([1.0, 2.0])
    like = torch.zeros(2, 3, 4, 4)
    assert ddpm.per_sample(values, like).shape == (2, 1, 1, 1)
    noise = torch.zeros(2, 3, 4, 4)
    channel = torch.arange(6.0).reshape(2, 3, 1, 1)
    shifted = ddpm.offset_noise(noise, channel, 0.1)
    torch.testing.assert_close(shifted[1, 2], torch.full((4, 4), 0.5))


def test_sampled_timesteps_are_uniform_in_range():
    schedule = ddpm.make_schedule(CONFIGS["sd15"])
    t = ddpm.sample_timesteps(20000, schedule, torch.Generator().manual_seed(0), "cpu")
    assert t.min() >= 0 and t.max() <= 999
    assert abs(t.float().mean().item() - 499.5) < 10
