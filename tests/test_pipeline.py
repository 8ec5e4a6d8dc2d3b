"""diffusers pipelines: offline save / load round trips, seeds, scheduler equivalence, coarse-to-fine."""

import dataclasses
import inspect
import json
import socket

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lfm_core.autoencoder import AutoencoderConfig, build_autoencoder
from lfm_core.errors import ConfigError
from lfm_core.paths import sigma_to_t, t_to_sigma
from lfm_core.pipeline import (
    CoarseToFinePipeline,
    DiffusersVelocity,
    LatentFlowPipeline,
    export_coarse_to_fine,
    export_pipeline,
)
from lfm_core.solvers import CFG, sample, seeded_noise, uniform_grid
from lfm_core.velocity import VelocityConfig, build_velocity

LATENT = (4, 8, 8)  # 16x16 images through a two-block autoencoder
STEPS = 8
SEEDS = [11, 3, 7, 5]
LABELS = [0, 2, 1, 2]
SCALE = 0.5  # a scaling factor != 1, so dividing by it matters


def _velocity(width, seed, num_classes=0):
    torch.manual_seed(seed)
    model = build_velocity(
        VelocityConfig(
            name="dit-xs",
            in_channels=LATENT[0],
            sample_size=LATENT[1],
            num_classes=num_classes,
            width=width,
        )
    )
    for p in model.parameters():  # leave adaLN-Zero's all-zero start so the velocity is not 0
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a shared 2-core machine thread hand-offs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae():
    cfg = AutoencoderConfig(
        in_channels=3, latent_channels=LATENT[0], block_out_channels=(8, 8), sample_size=16
    )
    model = build_autoencoder(cfg)
    model.register_to_config(scaling_factor=SCALE)
    return model.eval()


@pytest.fixture(scope="module")
def conditional():
    return _velocity(16, 0, num_classes=3)


@pytest.fixture
def offline(monkeypatch):
    """No hub: the env flag, and any network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading a local pipeline")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _public(config):
    """A diffusers config without its bookkeeping keys ("_class_name", "_use_default_values")."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _in_memory(vae, model):
    return _quiet(
        LatentFlowPipeline(
            vae=vae,
            velocity=DiffusersVelocity.from_velocity(model),
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
    )


def test_wrapper_takes_exactly_the_velocity_config_fields(conditional):
    params = list(inspect.signature(DiffusersVelocity.__init__).parameters)[1:]
    assert params == [f.name for f in dataclasses.fields(VelocityConfig)]
    wrapper = DiffusersVelocity.from_velocity(conditional)
    assert wrapper.velocity_config == conditional.config
    x, t, y = torch.randn(2, *LATENT), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(wrapper(x, t, class_labels=y), conditional(x, t, class_labels=y))


def test_round_trip_reproduces_images_bit_exactly(vae, conditional, tmp_path, offline):
    pipe = _quiet(export_pipeline(tmp_path, vae, conditional))
    assert (
        sorted(p.name for p in tmp_path.rglob("*.safetensors"))
        == ["diffusion_pytorch_model.safetensors"] * 2
    )
    assert not list(tmp_path.rglob("*.bin"))
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["velocity"] == ["lfm_core.pipeline", "DiffusersVelocity"]

    loaded = _quiet(LatentFlowPipeline.from_pretrained(tmp_path))
    assert isinstance(loaded.velocity, DiffusersVelocity) and not loaded.velocity.training
    assert loaded.velocity.velocity_config == conditional.config
    assert loaded.vae.config.scaling_factor == SCALE
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    for kwargs in ({}, {"class_labels": LABELS, "guidance_scale": 2.0}):
        before = pipe(SEEDS, num_steps=STEPS, **kwargs)
        after = loaded(SEEDS, num_steps=STEPS, **kwargs)
        assert torch.equal(before.images, after.images)
        assert torch.equal(before.latents, after.latents)


def test_samples_are_guided_euler_latents_decoded_through_the_scaling_factor(vae, conditional):
    pipe = _in_memory(vae, conditional)
    out = pipe(SEEDS, num_steps=STEPS, class_labels=LABELS, guidance_scale=2.0)
    guided = CFG(conditional, torch.tensor(LABELS), 2.0, null_label=3)
    expected = sample(guided, seeded_noise(SEEDS, LATENT), uniform_grid(STEPS), "euler")
    assert torch.equal(out.latents, expected)
    with torch.no_grad():
        images = (vae.decode(expected / SCALE).sample.clamp(-1, 1) + 1) / 2
    assert out.images.shape == (len(SEEDS), 3, 16, 16)
    assert torch.equal(out.images, images)
    unguided = pipe(SEEDS, num_steps=STEPS, class_labels=LABELS)
    assert not torch.allclose(unguided.latents, out.latents)

    pil = pipe(SEEDS, num_steps=STEPS, class_labels=LABELS, guidance_scale=2.0, output_type="pil")
    assert [(im.mode, im.size) for im in pil.images] == [("RGB", (16, 16))] * len(SEEDS)
    as_bytes = torch.tensor(np.asarray(pil.images[1])).permute(2, 0, 1)
    assert torch.equal(as_bytes, (out.images[1] * 255).round().to(torch.uint8))


def test_guidance_on_a_channel_subset_as_the_papers_imagenet_cfg(vae, conditional):
    pipe = _in_memory(vae, conditional)
    out = pipe(SEEDS, num_steps=STEPS, class_labels=LABELS, guidance_scale=4.0, cfg_channels=3)
    guided = CFG(conditional, torch.tensor(LABELS), 4.0, null_label=3, channels=3)
    expected = sample(guided, seeded_noise(SEEDS, LATENT), uniform_grid(STEPS), "euler")
    assert torch.equal(out.latents, expected)
    full = pipe(SEEDS, num_steps=STEPS, class_labels=LABELS, guidance_scale=4.0)
    assert not torch.equal(full.latents, out.latents)


def test_image_of_a_seed_does_not_depend_on_its_batch(vae, conditional):
    pipe = _in_memory(vae, conditional)
    kwargs = {"num_steps": STEPS, "guidance_scale": 2.0}
    batch = pipe(SEEDS, class_labels=LABELS, **kwargs)
    # The noise is drawn per seed exactly; the network's kernels may block the rows of a batch
    # differently by batch size and position, so images agree up to float32 rounding.
    other = pipe([5, 99, 11, 42], class_labels=[2, 0, 0, 1], **kwargs)
    pairs = [(other.images[0], batch.images[3]), (other.images[2], batch.images[0])]
    for i, seed in enumerate(SEEDS):
        alone = pipe([seed], class_labels=[LABELS[i]], **kwargs)
        pairs += [(alone.images[0], batch.images[i]), (alone.latents[0], batch.latents[i])]
    for a, b in pairs:
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
    assert (batch.latents[0] - batch.latents[1]).abs().max() > 0.1


def test_scheduler_steps_are_our_euler_steps(conditional):
    """FlowMatchEulerDiscreteScheduler on sigma = t_to_sigma(grid), model output -v.

    On a dyadic grid every t and sigma is exact in float32, so the two agree bit for bit;
    on 60 steps they differ only by float32 rounding of the grid.
    """
    noise = seeded_noise(SEEDS, LATENT)

    def velocity(x, t):
        return conditional(x, t, class_labels=torch.tensor(LABELS))

    for steps, atol in ((STEPS, 0.0), (60, 1e-5)):
        grid = uniform_grid(steps)
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(sigmas=t_to_sigma(grid[:-1]).tolist())
        x = noise
        with torch.no_grad():
            for timestep, sigma in zip(scheduler.timesteps, scheduler.sigmas[:-1], strict=True):
                t = sigma_to_t(sigma).expand(len(SEEDS))
                x = scheduler.step(-velocity(x, t), timestep, x).prev_sample
        ours = sample(velocity, noise, grid, "euler")
        assert torch.allclose(x, ours, rtol=0, atol=atol)
        assert not torch.allclose(ours, noise, atol=0.1)


def test_coarse_to_fine_with_one_model_equals_single_pipeline(vae, conditional):
    single = _in_memory(vae, conditional)
    wrapped = DiffusersVelocity.from_velocity(conditional)
    pipe = _quiet(
        CoarseToFinePipeline(
            vae=vae,
            coarse=wrapped,
            fine=wrapped,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            t_split=0.5,
        )
    )
    kwargs = {"num_steps": STEPS, "class_labels": LABELS, "guidance_scale": 2.0}
    reference = single(SEEDS, **kwargs)
    for t_split in (None, 0.0, 1.0):
        out = pipe(SEEDS, t_split=t_split, **kwargs)
        assert torch.equal(out.images, reference.images)
        assert torch.equal(out.latents, reference.latents)
    assert (out.nfe_coarse, out.nfe_fine) == (STEPS, 0)
    assert (pipe(SEEDS, **kwargs).nfe_coarse, pipe(SEEDS, **kwargs).nfe_fine) == (4, 4)


def test_coarse_to_fine_round_trip_keeps_t_split(vae, tmp_path, offline):
    coarse, fine = _velocity(16, 1), _velocity(32, 2)
    pipe = _quiet(export_coarse_to_fine(tmp_path, vae, coarse, fine, t_split=0.375))
    assert json.loads((tmp_path / "model_index.json").read_text())["t_split"] == 0.375
    loaded = _quiet(CoarseToFinePipeline.from_pretrained(tmp_path))
    assert loaded.config.t_split == 0.375
    assert loaded.coarse.velocity_config.width == 16 and loaded.fine.velocity_config.width == 32
    before, after = pipe(SEEDS, num_steps=STEPS), loaded(SEEDS, num_steps=STEPS)
    assert torch.equal(before.images, after.images)
    assert (after.nfe_coarse, after.nfe_fine) == (3, 5)
    fine_only = loaded(SEEDS, num_steps=STEPS, t_split=0.0)
    assert not torch.allclose(fine_only.latents, after.latents, atol=1e-3)


def test_loading_errors_are_one_line_config_errors(vae, conditional, tmp_path, offline):
    def one_line(call):
        with pytest.raises(ConfigError) as err:
            call()
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "not a local folder" in one_line(
        lambda: LatentFlowPipeline.from_pretrained(tmp_path / "missing")
    )
    assert "model_index.json" in one_line(lambda: LatentFlowPipeline.from_pretrained(tmp_path))
    export_coarse_to_fine(tmp_path / "c2f", vae, conditional, conditional, t_split=0.5)
    assert "CoarseToFinePipeline" in one_line(
        lambda: LatentFlowPipeline.from_pretrained(tmp_path / "c2f")
    )
    export_pipeline(tmp_path / "single", vae, conditional)
    (tmp_path / "single" / "velocity" / "diffusion_pytorch_model.safetensors").unlink()
    assert "cannot load" in one_line(
        lambda: LatentFlowPipeline.from_pretrained(tmp_path / "single")
    )


def test_bad_inputs_are_config_errors(vae, conditional, tmp_path):
    pipe = _in_memory(vae, conditional)
    unconditional = _in_memory(vae, _velocity(16, 3))
    bad_calls = {
        "output_type": lambda: pipe(SEEDS, num_steps=2, output_type="np"),
        "seeds": lambda: pipe([], num_steps=2),
        "class_labels": lambda: pipe(SEEDS, num_steps=2, class_labels=[0, 1]),
        "[0, 2]": lambda: pipe(SEEDS, num_steps=2, class_labels=[0, 1, 2, 3]),
        "guidance_scale": lambda: unconditional(SEEDS, num_steps=2, guidance_scale=2.0),
        "unconditional": lambda: unconditional(SEEDS, num_steps=2, class_labels=LABELS),
        "steps": lambda: pipe(SEEDS, num_steps=0),
        "scheduler.shift": lambda: LatentFlowPipeline(
            vae=vae,
            velocity=DiffusersVelocity.from_velocity(conditional),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        ),
        "t_split": lambda: export_coarse_to_fine(tmp_path, vae, conditional, conditional, 1.5),
    }
    for expected, call in bad_calls.items():
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
            call()
    wide = build_velocity(VelocityConfig(name="dit-xs", in_channels=8, sample_size=8, width=16))
    with pytest.raises(ConfigError, match="in_channels"):
        _in_memory(vae, wide)
