"""The generator checkpoint: a diffusers-style folder, and the networks in it.

    step-0004000/
      ddchallenge.json        what the model is for (dataset, classes, shapes, latent scale), its
                              training config and step, the VAE's provenance, library versions
      unet/                   the EMA denoiser (UNet2DModel.save_pretrained, safetensors)
      scheduler/              the training noise schedule (DDPMScheduler.save_pretrained)
      vae/                    latent space only: the AutoencoderKL, copied in so the folder is
                              self-contained (a sandboxed Track 2 run has no network)
      codebooks/              D4M prototypes and D3M class vectors, when made (diffusion/codebook.py)
      samples.png             a grid of samples at this step
      training_state/         for --resume only: raw weights, optimiser state

`load_generator` reads a folder, a training output folder (its newest
complete step-* checkpoint) or a Hugging Face Hub id, only through
safetensors and JSON, and checks every part against ddchallenge.json. Every
JSON file is read and checked by diffusion/folder.py before diffusers sees
it, and diffusers builds networks from checked dicts only: nothing a folder
holds can make it look a name up on the Hub.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

import torch

from ddchallenge.diffusion.config import SPACES, TrainConfig
from ddchallenge.diffusion.folder import (
    ModelArgumentError, ModelError, check_meta, load_network, read_json_object,
    scheduler_config as read_scheduler_config, unet_config, vae_config,
)
from ddchallenge.errors import UsageError
from ddchallenge.protocol import VALIDATION_SUFFIX, DatasetSpec

log = logging.getLogger(__name__)

META_FILE = "ddchallenge.json"
# Names (glob patterns, at any depth) in a generator folder that generation never reads: training leftovers and
# pickles. A sandboxed Track 2 run is given the folder without them, and a run in-process ignores them alike.
NEVER_READ = ("training_state", "*.bin", "*.pt", "*.ckpt", "*.pkl")
FORMAT = "ddchallenge-diffusion"
CHECKPOINT = re.compile(r"^step-(\d{7})$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
SERVING_PARTS = ("unet", "scheduler", "vae", "codebooks")  # what generation reads (and the model hash covers)
# Names that mark a model in a listing: diffusers configs and weight files (a generator's, or any model's).
MODEL_CONFIGS = ("model_index.json", "config.json", "scheduler_config.json")
MODEL_WEIGHTS = (".safetensors", ".ckpt", ".bin", ".pth")


def generator_marker(paths: Iterable[str]) -> str | None:
    """What in a listing of relative paths (a folder's files and folders, a
    zip's members) shows a generator or other model, named with its path; None
    when nothing does. A Track 1 upload holding one is refused (upload.py)."""
    for rel in sorted(paths):
        parts = PurePosixPath(rel.replace("\\", "/")).parts
        if META_FILE in parts:
            return f"{rel}: a ddchallenge generator's description"
        if any(CHECKPOINT.match(p) for p in parts):
            return f"{rel}: a training checkpoint"
        name = parts[-1] if parts else ""
        if name in MODEL_CONFIGS:
            return f"{rel}: a diffusers config"
        if name.lower().endswith(MODEL_WEIGHTS):
            return f"{rel}: model weights"
    return None


def downsampling(levels: int) -> int:
    """How much a diffusers UNet or VAE with this many levels shrinks its input per side."""
    return 2 ** (levels - 1)


def build_unet(config: TrainConfig, in_shape: tuple[int, int, int], classes: int):
    """A class-conditional UNet2DModel: `classes + 1` class embeddings, the
    last one the null class of classifier-free guidance."""
    from diffusers import UNet2DModel

    channels, size, _ = in_shape
    factor = downsampling(len(config.channels))
    if size % factor:
        raise UsageError(
            f"a {len(config.channels)}-level UNet halves its input {len(config.channels) - 1} times, so it needs a "
            f"size divisible by {factor}; the {'latent' if config.space == 'latent' else 'image'} is {size}x{size}"
        )
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention))
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, down_block_types=down, up_block_types=up,
        block_out_channels=tuple(config.channels), layers_per_block=config.layers_per_block,
        norm_num_groups=min(32, min(config.channels)), attention_head_dim=32, num_class_embeds=classes + 1,
    )


def build_scheduler(prediction: str):
    from diffusers import DDPMScheduler

    # Cosine schedule, trailing timesteps: sampling in few steps starts from pure noise.
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction,
                         timestep_spacing="trailing", clip_sample=False)


class PixelCodec:
    """How images and the VAE's space meet: the dataset's channels in and out
    (a 3-channel VAE reads a greyscale image repeated, and its output is
    averaged back), [-1, 1] pixels, latents multiplied by `scale`."""

    def __init__(self, vae, channels: int, scale: float):
        vae_in = vae.config.in_channels
        if vae_in != channels and not (channels == 1 and vae_in == 3):
            raise ModelError(f"the VAE reads {vae_in}-channel images; the dataset has {channels}")
        self.vae, self.channels, self.scale = vae, channels, scale

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the scaled posterior of pixels x in [-1, 1]."""
        if x.shape[1] != self.vae.config.in_channels:
            x = x.repeat(1, self.vae.config.in_channels, 1, 1)
        dist = self.vae.encode(x).latent_dist
        return dist.mean * self.scale, dist.std * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(z / self.scale).sample
        return x.mean(dim=1, keepdim=True) if x.shape[1] != self.channels else x


def latent_shape(vae, size: int) -> tuple[int, int, int]:
    factor = downsampling(len(vae.config.block_out_channels))
    if size % factor:
        raise UsageError(f"the VAE shrinks images {factor}x per side, which does not divide the {size}-pixel images; "
                         "use a VAE with fewer levels")
    return (vae.config.latent_channels, size // factor, size // factor)


def load_vae(ref: str):
    """An AutoencoderKL from a local folder or a Hub id (safetensors only),
    and its provenance."""
    from diffusers import AutoencoderKL

    folder, provenance = resolve(ref, what="VAE")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a whole pipeline (e.g. a Stable Diffusion repo): take its VAE
    return load_network(AutoencoderKL, folder, vae_config(folder / "config.json")), provenance


def load_unet(folder: Path):
    """The UNet2DModel of a unet/ folder: config checked, weights from its
    safetensors file, nothing fetched."""
    from diffusers import UNet2DModel

    return load_network(UNet2DModel, folder, unet_config(folder / "config.json"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def resolve(ref: str, what: str = "model") -> tuple[Path, dict]:
    """A local folder for `ref` (a folder, or a Hub id `owner/name[@revision]`
    fetched through huggingface-hub's cache) and its provenance."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelArgumentError(f"{what} {ref} is a file; pass the folder that holds it")
        return path.resolve(), {"source": str(path.resolve()), "hub_id": None, "revision": None}
    if not HUB_ID.match(ref):
        raise ModelArgumentError(f"{what} {ref} is neither an existing folder nor a Hugging Face Hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, _, revision = ref.partition("@")
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, ignore_patterns=["training_state/*", "*.bin",
                                                                                          "*.ckpt", "*.pt"]))
    except LocalEntryNotFoundError:
        raise ModelError(f"{what} {ref} is not in the local Hugging Face cache and the Hub cannot be reached "
                         "(offline); download it where there is network (`hf download "
                         f"{repo}{f' --revision {revision}' if revision else ''}`) or pass a local folder") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelError(f"{what} {ref} was not found on the Hugging Face Hub ({_first_line(exc)})") from None
    except OSError as exc:
        raise ModelError(f"cannot fetch {what} {ref} from the Hugging Face Hub ({_first_line(exc)})") from None
    return folder, {"source": ref, "hub_id": repo, "revision": folder.name}


def model_hash(folder: Path) -> str:
    """sha256 over the files generation reads: ddchallenge.json and the
    serving parts, by relative path and content."""
    from ddchallenge.fileio import sha256_file

    digest = hashlib.sha256()
    files = [folder / META_FILE] + sorted(p for part in SERVING_PARTS for p in (folder / part).rglob("*") if p.is_file())
    for p in files:
        if p.exists():
            digest.update(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()


def checkpoints(output: Path) -> list[Path]:
    """Complete step-* checkpoints in a training output folder, oldest first
    (a checkpoint only gets its name once it is whole)."""
    if not output.is_dir():
        return []
    return sorted(p for p in output.iterdir() if CHECKPOINT.match(p.name) and (p / META_FILE).is_file())


def meta_file(path: str | os.PathLike) -> Path:
    """The ddchallenge.json that describes a generator folder: its own (a
    link too, refused when read), else its newest checkpoint's; ModelError
    where it has neither."""
    path = Path(path)
    if os.path.lexists(path / META_FILE):
        return path / META_FILE
    found = checkpoints(path)
    if not found:
        raise ModelError(f"{path} is not a ddchallenge diffusion model: it holds neither {META_FILE} nor a step-* "
                         "checkpoint; pass a folder written by `ddchallenge train` (or one of its step-* checkpoints)")
    return found[-1] / META_FILE


def generator_dataset(path: str | os.PathLike) -> str:
    """The dataset a generator folder says it was trained for (read as
    bounded JSON only)."""
    meta_path = meta_file(path)
    name = read_json_object(meta_path).get("dataset")
    if not isinstance(name, str):
        raise ModelError(f"{meta_path}: dataset must be a dataset name; this folder does not name its dataset")
    return name


@dataclass
class Generator:
    """A loaded generator, ready to sample."""

    unet: torch.nn.Module
    scheduler_config: dict
    codec: PixelCodec | None  # None: pixel space
    meta: dict  # ddchallenge.json
    provenance: dict  # source, hub_id, revision, folder, model_sha256

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latent_shape"] if self.codec else self.meta["image_shape"])

    @property
    def null_class(self) -> int:
        return int(self.meta["classes"])

    def to(self, device: torch.device) -> "Generator":
        self.unet.to(device)
        if self.codec:
            self.codec.vae.to(device)
        return self


def _read_meta(folder: Path, ref: str) -> dict:
    meta_path = folder / META_FILE
    if not meta_path.is_file() and not meta_path.is_symlink():
        raise ModelError(f"{ref} is not a ddchallenge diffusion model: {META_FILE} is missing; pass a folder written "
                         "by `ddchallenge train` (or one of its step-* checkpoints)")
    return check_meta(read_json_object(meta_path), str(meta_path), FORMAT, SPACES)


def _check_unet(config: dict, sample_shape: tuple[int, ...], spec: DatasetSpec, where: str) -> None:
    """The UNet a folder describes must fit what ddchallenge.json says it samples."""
    channels, size = sample_shape[0], sample_shape[1]
    if (config["in_channels"], config["out_channels"], config["sample_size"]) != (channels, channels, size) or \
            config["num_class_embeds"] != spec.classes + 1:
        raise ModelError(f"{where}: the UNet takes {config['in_channels']}x{config['sample_size']} inputs, gives "
                         f"{config['out_channels']} channels and has {config['num_class_embeds']} classes; "
                         f"ddchallenge.json says {list(sample_shape)} and {spec.classes} + 1 (null)")
    factor = downsampling(len(config["block_out_channels"]))
    if size % factor:
        raise ModelError(f"{where}: a {len(config['block_out_channels'])}-level UNet needs a sample_size divisible "
                         f"by {factor}, got {size}")


def load_generator(ref: str, spec: DatasetSpec) -> Generator:
    """Load and check a generator for `spec`; every mismatch is a ModelError
    that names the file and the fix, raised before any sampling."""
    folder, provenance = resolve(ref)
    if not (folder / META_FILE).exists() and checkpoints(folder):
        folder = checkpoints(folder)[-1]
        log.info("using the newest checkpoint %s", folder.name)
    meta = _read_meta(folder, ref)
    if meta["classes"] != spec.classes or tuple(meta["image_shape"]) != spec.image_shape:
        raise ModelError(f"{ref} was trained for {meta['dataset']} ({meta['classes']} classes of "
                         f"{'x'.join(map(str, meta['image_shape']))}); {spec.name} has {spec.classes} classes of "
                         f"{'x'.join(map(str, spec.image_shape))}")
    if spec.validation_of is not None and meta["dataset"] != spec.name:
        # Its training images include the ones this view holds out: validating it on them would flatter it.
        raise ModelError(f"{ref} was trained on {meta['dataset']}, not on {spec.name}, so it may have seen the images "
                         f"{spec.name} validates on; train the generator you tune with `ddchallenge train {spec.name}`")
    if meta["dataset"] == spec.name + VALIDATION_SUFFIX:
        log.info("%s was trained on %s, a part of %s's training images", ref, meta["dataset"], spec.name)
    elif meta["dataset"] != spec.name:
        log.warning("%s was trained on %s; generating for %s (same classes and shape)", ref, meta["dataset"], spec.name)
    for part in ("unet", "scheduler") + (("vae",) if meta["space"] == "latent" else ()):
        if not (folder / part).is_dir():
            raise ModelError(f"{ref} is missing its {part}/ folder; copy the whole checkpoint folder")
    from diffusers import UNet2DModel

    scheduler_config = read_scheduler_config(folder / "scheduler" / "scheduler_config.json")
    sample_shape = tuple(meta["latent_shape"]) if meta["space"] == "latent" else spec.image_shape
    config = unet_config(folder / "unet" / "config.json")
    _check_unet(config, sample_shape, spec, f"{folder / 'unet' / 'config.json'}")
    codec = None
    if meta["space"] == "latent":
        vae, _ = load_vae(str(folder / "vae"))
        if vae.config.out_channels != vae.config.in_channels:
            raise ModelError(f"{folder / 'vae' / 'config.json'}: out_channels ({vae.config.out_channels}) must equal "
                             f"in_channels ({vae.config.in_channels})")
        codec = PixelCodec(vae, spec.channels, meta["latent_scale"])
        if list(latent_shape(vae, spec.size)) != meta.get("latent_shape"):
            raise ModelError(f"{ref}: the VAE's latent shape does not match ddchallenge.json's latent_shape")
    unet = load_network(UNet2DModel, folder / "unet", config)
    if scheduler_config.get("prediction_type") != meta["prediction"]:
        raise ModelError(f"{ref}: scheduler/ predicts {scheduler_config.get('prediction_type')}, ddchallenge.json "
                         f"says {meta['prediction']}")
    unet.eval().requires_grad_(False)
    if codec:
        codec.vae.eval().requires_grad_(False)
    provenance.update(folder=str(folder), model_sha256=model_hash(folder), step=meta.get("step"))
    return Generator(unet, scheduler_config, codec, meta, provenance)


# The distribution matching steps a folder runs under Track 2 unless told otherwise: what `train` writes for
# diffusion and `prototypes`/`invert --make-default` for d4m/d3m. Decided per method on the validation view
# (docs/benchmarks.md, "Track 2 under the honest protocol", mnist5k IPC 10, the higher mean wins): diffusion 91.40
# with against 89.07 without, d3m 91.07 against 89.07, d4m 94.00 against 93.67. Matching is anytime, so it
# spends what the budget leaves and never fails a run for time.
TRACK2_MATCH_STEPS = 300


def describe(config: TrainConfig, spec: DatasetSpec, step: int, latent_scale: float,
             latent: tuple[int, int, int] | None, vae_provenance: dict | None) -> dict:
    """The contents of ddchallenge.json."""
    import diffusers

    from ddchallenge import __version__

    return {
        "format": FORMAT, "dataset": spec.name, "classes": spec.classes, "image_shape": list(spec.image_shape),
        "space": config.space, "latent_shape": list(latent) if latent else None, "latent_scale": float(latent_scale),
        "prediction": config.prediction, "step": step, "train_config": config.to_json(), "vae": vae_provenance,
        "versions": {"ddchallenge": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        # How Track 2 runs this folder (generators.track2); `prototypes`, `invert` and `settings` change it.
        "generate": {"method": "diffusion", "settings": {"match_steps": TRACK2_MATCH_STEPS}},
    }

