"""Trained models as diffusers pipelines: export to a folder, reload with `from_pretrained`.

An exported folder is a standard diffusers pipeline folder (model_index.json plus one subfolder
per component, weights as safetensors): `vae` (AutoencoderKL), `velocity` (or `coarse` and
`fine`) as `DiffusersVelocity`, and `scheduler` (FlowMatchEulerDiscreteScheduler, JSON).
model_index.json names this module ("lfm_core.pipeline") as the library of the velocity
component; diffusers resolves such a name from the already imported modules only, which calling
`LatentFlowPipeline.from_pretrained` guarantees. Loading reads local folders only (no hub).

The export functions also write a module file into the folder (`custom_pipeline_file`:
`latent_flow_pipeline.py` or `coarse_to_fine_pipeline.py`) that imports the folder's pipeline
class from this package, so the folder also loads with plain diffusers, offline, wherever
lfm_core is installed: `DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(
custom_pipeline_file(folder)), trust_remote_code=True)` (diffusers asks for trust_remote_code
before running a module file of a folder; this one only imports lfm_core).

Sampling runs this package's own solver (`lfm_core.solvers.sample`, Euler on
`uniform_grid(num_steps)`, t = 0 noise), so a loaded pipeline gives bit for bit the samples
the rest of the package gives. The scheduler is the recorded description of that sampler: an
unshifted FlowMatchEulerDiscreteScheduler stepped on sigmas = t_to_sigma(grid) with the model
output -v takes the same Euler steps (diffusers' sigma = 1 - t runs backwards, so
d x / d sigma = -v). Only such scheduler configs are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.utils import BaseOutput
from torch import Tensor

from lfm_core.autoencoder import decode
from lfm_core.coarse_to_fine import PAPER_T_SPLIT, sample_coarse_to_fine
from lfm_core.errors import ConfigError, check_choice, check_range
from lfm_core.solvers import CFG, VelocityFn, sample, seeded_noise, uniform_grid
from lfm_core.velocity import VelocityConfig, VelocityModel, build_velocity

OUTPUT_TYPES = ("pt", "pil")
DEFAULT_STEPS = 60
MODEL_INDEX = "model_index.json"
# Scheduler settings under which its steps are this package's uniform Euler steps in t.
UNIFORM_EULER_SCHEDULER = {
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
}


# Both bases declare `config_name` (ModelMixin sets it); mypy flags the differing declarations.
class DiffusersVelocity(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """A velocity network as a diffusers model, so `save_pretrained` / `from_pretrained` work.

    Its diffusers config holds the VelocityConfig fields (one keyword each); the network is
    built by `build_velocity` and called as `model(x, t, class_labels=None)` with x (B, C, H, W),
    t (B,) in [0, 1] (t = 0 noise) and class_labels (B,) int64 or None; it returns (B, C, H, W).
    """

    @register_to_config
    def __init__(
        self, name: str, in_channels: int, sample_size: int, num_classes: int, width: int | None
    ):
        super().__init__()
        self.network = build_velocity(
            VelocityConfig(
                name=name,
                in_channels=in_channels,
                sample_size=sample_size,
                num_classes=num_classes,
                width=width,
            )
        )

    @classmethod
    def from_velocity(cls, model: VelocityModel) -> DiffusersVelocity:
        """Wrap a VelocityModel; the wrapper shares its parameters (no copy) and sets it to eval."""
        # The network built by __init__ is replaced at once: build it on the meta device so
        # no memory or time goes into random weights.
        with torch.device("meta"):
            wrapper = cls(**model.config.to_dict())
        wrapper.network = model
        return wrapper.eval()

    @property
    def velocity_config(self) -> VelocityConfig:
        return self.network.config

    @property
    def null_label(self) -> int:
        return self.network.null_label

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.network(x, t, class_labels=class_labels)


@dataclass
class LatentFlowOutput(BaseOutput):
    """Pipeline samples.

    Attributes:
        images: (N, C, H, W) float32 in [0, 1] on the CPU, or N PIL images.
        latents: (N, c, h, w) scaled latents at t = 1 (what the velocity model produced), CPU.
    """

    images: Tensor | list[PIL.Image.Image]
    latents: Tensor


@dataclass
class CoarseToFineOutput(LatentFlowOutput):
    """Coarse-to-fine samples with each model's function evaluations and the ODE wall-clock time."""

    nfe_coarse: int
    nfe_fine: int
    seconds: float


def _check_components(
    vae: AutoencoderKL, scheduler: FlowMatchEulerDiscreteScheduler, *models: DiffusersVelocity
) -> None:
    """One-line ConfigError unless the scheduler is uniform Euler and the models fit the vae."""
    for key, required in UNIFORM_EULER_SCHEDULER.items():
        value = scheduler.config.get(key)
        if value != required:
            raise ConfigError(
                f"scheduler.{key}: {value!r} is not supported; sampling takes uniform Euler "
                f"steps in t and needs {key}={required!r}"
            )
    latent_channels = vae.config["latent_channels"]
    shapes = set()
    for model in models:
        cfg = model.velocity_config
        if cfg.in_channels != latent_channels:
            raise ConfigError(
                f"in_channels: velocity model {cfg.name!r} takes {cfg.in_channels} channels, "
                f"the autoencoder makes {latent_channels}"
            )
        shapes.add((cfg.in_channels, cfg.sample_size, cfg.num_classes))
    if len(shapes) > 1:
        raise ConfigError(
            f"velocity models disagree on (in_channels, sample_size, num_classes): {sorted(shapes)}"
        )


def _class_labels(
    model: DiffusersVelocity,
    class_labels: Sequence[int] | Tensor | None,
    count: int,
    guidance_scale: float,
    device: torch.device,
) -> Tensor | None:
    """Checked labels (count,) int64 on `device`, or None for unlabelled sampling."""
    num_classes = model.velocity_config.num_classes
    if not num_classes:
        if class_labels is not None:
            raise ConfigError("class_labels: the velocity model is unconditional; pass None")
        if guidance_scale != 1.0:
            raise ConfigError(
                f"guidance_scale: {guidance_scale} needs a class-conditional velocity model; "
                "use 1.0"
            )
        return None
    if class_labels is None:
        if guidance_scale != 1.0:
            raise ConfigError(
                f"class_labels: guidance_scale={guidance_scale} needs one label per seed"
            )
        return None
    labels = torch.as_tensor(class_labels, dtype=torch.long).cpu()
    if tuple(labels.shape) != (count,):
        raise ConfigError(
            f"class_labels: shape {tuple(labels.shape)} must be ({count},), one label per seed"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"class_labels: values must lie in [0, {num_classes - 1}]")
    return labels.to(device)


def _guided(
    model: DiffusersVelocity,
    labels: Tensor | None,
    guidance_scale: float,
    cfg_channels: int | None = None,
) -> VelocityFn:
    """v(x, t): the model itself without labels, else classifier-free guidance around it
    (on the first `cfg_channels` channels; None: all)."""
    if labels is None:
        return model
    return CFG(model, labels, guidance_scale, model.null_label, cfg_channels)


class _Ticking:
    """A velocity function that advances a progress bar once per call (one per Euler step)."""

    def __init__(self, velocity_fn: VelocityFn, bar: Any):
        self.velocity_fn, self.bar = velocity_fn, bar

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.bar.update()
        return self.velocity_fn(x, t)


@dataclass(frozen=True)
class _Request:
    """A checked pipeline call: the seeds' noise (N, C, s, s) and the labels (N,) or None."""

    noise: Tensor
    labels: Tensor | None
    guidance_scale: float
    cfg_channels: int | None = None

    def velocity_fn(self, model: DiffusersVelocity, bar: Any) -> VelocityFn:
        """v(x, t) of `model`, guided when labelled, advancing `bar` once per call."""
        guided = _guided(model, self.labels, self.guidance_scale, self.cfg_channels)
        return _Ticking(guided, bar)


class _LatentPipeline(DiffusionPipeline):
    """What both pipelines share: local loading with one-line errors, noise and decoding."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):  # type: ignore[override]
        """Load a folder written by `save_pretrained` (or the export functions) of this class.

        Raises:
            ConfigError: the folder or its model_index.json is missing, it holds another
                pipeline class, or a component cannot be loaded.
        """
        folder = Path(pretrained_model_name_or_path).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"pipeline: {str(folder)!r} is not a local folder (a hub repo must be downloaded "
                "first, e.g. with huggingface_hub.snapshot_download)"
            )
        index = folder / MODEL_INDEX
        if not index.is_file():
            raise ConfigError(f"pipeline: {str(index)!r} is missing (save with save_pretrained)")
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError as err:
            raise ConfigError(f"pipeline: {str(index)!r} is not valid JSON ({err.msg})") from None
        if class_name != cls.__name__:
            raise ConfigError(
                f"pipeline: {str(folder)!r} holds a {class_name!r}; load it with that class, "
                f"not {cls.__name__!r}"
            )
        try:
            return super().from_pretrained(str(folder), **kwargs)
        except ConfigError:
            raise
        except (OSError, ValueError) as err:
            reason = " ".join(str(err).split())
            raise ConfigError(f"pipeline: cannot load {str(folder)!r}: {reason}") from None

    def _request(
        self,
        model: DiffusersVelocity,
        seeds: Sequence[int],
        class_labels: Sequence[int] | Tensor | None,
        guidance_scale: float,
        output_type: str,
        cfg_channels: int | None = None,
    ) -> _Request:
        """Check a call's arguments against `model`; its noise and labels (one-line errors)."""
        check_choice("output_type", output_type, OUTPUT_TYPES)
        noise = self._noise(seeds, model)
        labels = _class_labels(model, class_labels, len(seeds), guidance_scale, self.device)
        return _Request(noise, labels, guidance_scale, cfg_channels)

    def _noise(self, seeds: Sequence[int], model: DiffusersVelocity) -> Tensor:
        """Noise (len(seeds), C, s, s) on the pipeline's device; row i from seeds[i] alone."""
        if not seeds:
            raise ConfigError("seeds: need at least one seed")
        cfg = model.velocity_config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        return seeded_noise(seeds, shape, device=self.device)

    def _images(self, latents: Tensor, output_type: str) -> Tensor | list[PIL.Image.Image]:
        """Decode scaled latents (N, c, h, w) to images in [0, 1] (N, C, H, W), or PIL images."""
        images = (decode(self.vae, latents, progress=False) + 1) / 2
        if output_type == "pil":
            return self.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
        return images


class LatentFlowPipeline(_LatentPipeline):
    """Sample images from a latent flow-matching model: noise -> Euler in t -> vae decode.

    Components: `vae` (AutoencoderKL; latents are divided by its config's scaling factor
    before decoding), `velocity` (DiffusersVelocity) and `scheduler` (an unshifted
    FlowMatchEulerDiscreteScheduler, recorded as the description of the sampler).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        velocity: DiffusersVelocity,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        _check_components(vae, scheduler, velocity)
        self.register_modules(vae=vae, velocity=velocity, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        seeds: Sequence[int],
        num_steps: int = DEFAULT_STEPS,
        class_labels: Sequence[int] | Tensor | None = None,
        guidance_scale: float = 1.0,
        output_type: str = "pt",
        cfg_channels: int | None = None,
    ) -> LatentFlowOutput:
        """Sample one image per seed; image i depends on seeds[i] (and its label) alone.

        Args:
            seeds: one seed per image; each seeds its own noise generator.
            num_steps: Euler steps over t in [0, 1] (one model call each, two with guidance
                batched as one).
            class_labels: (N,) labels in [0, num_classes) for a class-conditional model, or
                None (unconditional model, or the null label of a conditional one).
            guidance_scale: classifier-free guidance scale; 1 is the conditional model.
            output_type: "pt" for a tensor (N, C, H, W) in [0, 1], "pil" for PIL images.
            cfg_channels: guide only the first k latent channels, the rest being the conditional
                prediction (the paper's ImageNet setting: 3 of 8); None guides all channels.

        Returns:
            LatentFlowOutput with the images and the latents they were decoded from.
        """
        request = self._request(
            self.velocity, seeds, class_labels, guidance_scale, output_type, cfg_channels
        )
        grid = uniform_grid(num_steps)
        with self.progress_bar(total=num_steps) as bar:
            latents = sample(request.velocity_fn(self.velocity, bar), request.noise, grid, "euler")
        return LatentFlowOutput(images=self._images(latents, output_type), latents=latents.cpu())


class CoarseToFinePipeline(_LatentPipeline):
    """Coarse-to-fine sampling: `coarse` integrates t in [0, t_split), `fine` the rest.

    Components: `vae`, `coarse` and `fine` (DiffusersVelocity models of the same latent shape
    and classes) and `scheduler` (as in LatentFlowPipeline); `t_split` is recorded in the
    pipeline's config (model_index.json) and survives save / load.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        coarse: DiffusersVelocity,
        fine: DiffusersVelocity,
        scheduler: FlowMatchEulerDiscreteScheduler,
        t_split: float = PAPER_T_SPLIT,
    ):
        super().__init__()
        check_range("t_split", t_split, 0.0, 1.0)
        _check_components(vae, scheduler, coarse, fine)
        self.register_modules(vae=vae, coarse=coarse, fine=fine, scheduler=scheduler)
        self.register_to_config(t_split=t_split)

    @torch.no_grad()
    def __call__(
        self,
        seeds: Sequence[int],
        num_steps: int = DEFAULT_STEPS,
        class_labels: Sequence[int] | Tensor | None = None,
        guidance_scale: float = 1.0,
        output_type: str = "pt",
        t_split: float | None = None,
        cfg_channels: int | None = None,
    ) -> CoarseToFineOutput:
        """Sample one image per seed, switching from `coarse` to `fine` at t_split.

        Args are those of LatentFlowPipeline.__call__, plus t_split (None: the recorded one)
        so that one loaded pipeline can sweep switch times. A step belongs to the model of its
        start time, as in `lfm_core.coarse_to_fine.sample_coarse_to_fine`.

        Returns:
            CoarseToFineOutput: images, latents, NFE of each model and the ODE's seconds.
        """
        request = self._request(
            self.fine, seeds, class_labels, guidance_scale, output_type, cfg_channels
        )
        split = self.config["t_split"] if t_split is None else t_split
        with self.progress_bar(total=num_steps) as bar:
            result = sample_coarse_to_fine(
                request.velocity_fn(self.coarse, bar),
                request.velocity_fn(self.fine, bar),
                request.noise,
                split,
                steps=num_steps,
            )
        return CoarseToFineOutput(
            images=self._images(result.samples, output_type),
            latents=result.samples.cpu(),
            nfe_coarse=result.nfe_coarse,
            nfe_fine=result.nfe_fine,
            seconds=result.seconds,
        )


# One file name per class: diffusers caches a module file under its name, and two classes in one
# module would make its pipeline class ambiguous.
CUSTOM_PIPELINE_FILES = {
    "LatentFlowPipeline": "latent_flow_pipeline.py",
    "CoarseToFinePipeline": "coarse_to_fine_pipeline.py",
}


def custom_pipeline_file(directory: str | Path) -> Path:
    """The module file an exported folder holds for diffusers' `custom_pipeline=`.

    Raises:
        ConfigError: the folder holds no exported pipeline of this package.
    """
    folder = Path(directory)
    for name in CUSTOM_PIPELINE_FILES.values():
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"pipeline: {str(folder)!r} holds no lfm_core pipeline module file")


def write_custom_pipeline(directory: str | Path, pipeline_class: type[DiffusionPipeline]) -> Path:
    """Write the module diffusers' `custom_pipeline=` loads for an exported folder.

    diffusers takes the one DiffusionPipeline subclass defined or imported in the file, so the
    file imports only `pipeline_class`.

    Returns:
        The file's path (pass it as `custom_pipeline`).
    """
    path = Path(directory, CUSTOM_PIPELINE_FILES[pipeline_class.__name__])
    path.write_text(
        f'"""{pipeline_class.__name__} for DiffusionPipeline.from_pretrained(custom_pipeline=...)."""\n'
        f"from {pipeline_class.__module__} import {pipeline_class.__name__}\n\n"
        f'__all__ = ["{pipeline_class.__name__}"]\n'
    )
    return path


def _scheduler(
    scheduler: FlowMatchEulerDiscreteScheduler | None,
) -> FlowMatchEulerDiscreteScheduler:
    return scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler()


def export_pipeline(
    directory: str | Path,
    vae: AutoencoderKL,
    velocity_model: VelocityModel,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
) -> LatentFlowPipeline:
    """Save a trained model as a LatentFlowPipeline folder (safetensors + JSON configs).

    Args:
        directory: the folder to write (created if missing).
        vae: the autoencoder whose scaled latents the model was trained on.
        velocity_model: the trained (e.g. EMA) velocity network.
        scheduler: the recorded scheduler; default an unshifted FlowMatchEulerDiscreteScheduler.

    Returns:
        The pipeline that was saved (sharing the given modules' parameters); the folder also
        holds its `pipeline.py` for diffusers' `custom_pipeline=`.
    """
    pipe = LatentFlowPipeline(
        vae=vae,
        velocity=DiffusersVelocity.from_velocity(velocity_model),
        scheduler=_scheduler(scheduler),
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    write_custom_pipeline(directory, LatentFlowPipeline)
    return pipe


def export_coarse_to_fine(
    directory: str | Path,
    vae: AutoencoderKL,
    coarse: VelocityModel,
    fine: VelocityModel,
    t_split: float,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
) -> CoarseToFinePipeline:
    """Save a (coarse, fine) model pair and t_split as a CoarseToFinePipeline folder."""
    pipe = CoarseToFinePipeline(
        vae=vae,
        coarse=DiffusersVelocity.from_velocity(coarse),
        fine=DiffusersVelocity.from_velocity(fine),
        scheduler=_scheduler(scheduler),
        t_split=t_split,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    write_custom_pipeline(directory, CoarseToFinePipeline)
    return pipe
