"""What a generator folder says about itself, read as untrusted input.

A Track 2 upload is a folder of JSON and safetensors files. Every JSON file
in it is read here: bounded in size and nesting, NaN and Infinity refused,
each field checked for its type and a sane range before any of it reaches
diffusers, the sampler or a method. Every problem is a `ModelError` naming
the file, the field and what is expected. diffusers only ever sees a config
dictionary built from checked fields (`from_config`, never a path or a name
it could look up on the Hub), and the weights are loaded strictly from the
folder's safetensors file.

The sizes allowed here are far past any preset (config.py) and far below
what would exhaust a machine: a folder may not make the scorer build a
network of billions of parameters or sample in batches of millions.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import stat
from pathlib import Path

from ddchallenge.errors import DDChallengeError, UsageError

MAX_JSON_BYTES = 1 << 20  # every JSON file of a folder; ddchallenge.json with codebook records is a few KB
MAX_JSON_DEPTH = 32  # nesting of objects and lists; the deepest a folder writes is 4
MAX_CLASSES = 1000
MAX_IMAGE_CHANNELS = 16  # images and latents
MAX_SIZE = 1024  # pixels (or latent cells) per side; a VAE config's sample_size may say up to 4096
MAX_LEVELS = 6  # resolution levels of a UNet or VAE
MAX_WIDTH = 2048  # channels of one level
MAX_LAYERS = 8  # resnet blocks per level
MAX_PARAMETERS = 600_000_000  # estimated from the widths and layers; the largest preset UNet has 27 M
MAX_TRAIN_TIMESTEPS = 10_000  # of a noise schedule; every preset uses 1000
WEIGHTS = "diffusion_pytorch_model.safetensors"
PREDICTIONS = ("v_prediction", "epsilon")


class ModelError(DDChallengeError):
    """A generator folder that is missing, broken or made for another dataset."""


class ModelArgumentError(ModelError, UsageError):
    """A model argument that names no folder (a missing path, a file, not a
    Hub id): the command line's mistake (exit 2, as any other bad argument)."""


# ---------------------------------------------------------------- JSON

def read_json_object(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in `path`: a regular file (never a link) of at most
    `max_bytes`, nested at most MAX_JSON_DEPTH deep, without NaN or Infinity."""
    from ddchallenge.fileio import read_json_bounded

    def refused(why: str) -> ModelError:
        fix = {"is missing": "copy the whole model folder", "is not a plain file": "a model folder holds plain files "
               "only"}.get(why, "a model folder holds plain files only" if "symbolic link" in why else "refused")
        return ModelError(f"{path} {why}; {fix}")

    value = read_json_bounded(path, max_bytes, MAX_JSON_DEPTH, refused, finite=True)
    if not isinstance(value, dict):
        raise ModelError(f"{path} must hold a JSON object, not {_kind(value)}")
    return value


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def show(value) -> str:
    """A short rendering of an untrusted value for a message."""
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------- fields

def whole(where: str, field: str, value, low: int, high: int, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ModelError(f"{where}: {field} must be a whole number from {low} to {high}"
                         f"{' or null' if optional else ''}, got {show(value)}")
    return value


def number(where: str, field: str, value, low: float, high: float, optional: bool = False) -> float | None:
    if optional and value is None:
        return None
    # The range first: it refuses NaN too, and a JSON integer past any float (10**400) would make
    # math.isfinite raise OverflowError
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or not math.isfinite(value):
        raise ModelError(f"{where}: {field} must be a number from {low:g} to {high:g}"
                         f"{' or null' if optional else ''}, got {show(value)}")
    return value


def choice(where: str, field: str, value, choices, optional: bool = False):
    if optional and value is None:
        return None
    if not isinstance(value, str) or value not in choices:
        raise ModelError(f"{where}: {field} must be one of {', '.join(map(str, choices))}, got {show(value)}")
    return value


def flag(where: str, field: str, value) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{where}: {field} must be true or false, got {show(value)}")
    return value


def obj(where: str, field: str, value, optional: bool = False) -> dict | None:
    if optional and value is None:
        return None
    if not isinstance(value, dict):
        raise ModelError(f"{where}: {field} must be an object, got {show(value)}")
    return value


def whole_list(where: str, field: str, value, length: tuple[int, int], low: int, high: int) -> list[int]:
    if not isinstance(value, list) or not length[0] <= len(value) <= length[1] or any(
            isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high for v in value):
        count = f"{length[0]}" if length[0] == length[1] else f"{length[0]} to {length[1]}"
        raise ModelError(f"{where}: {field} must be a list of {count} whole numbers from {low} to {high}, got "
                         f"{show(value) if not isinstance(value, list) else json.dumps(value)[:60]}")
    return value


_FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max


def _number_list(where: str, field: str, value, most: int) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > most or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not -_FLOAT_MAX <= v <= _FLOAT_MAX
            for v in value):  # refuses NaN, infinities and integers past any float (10**400) alike
        raise ModelError(f"{where}: {field} must be null or a list of at most {most} finite numbers")
    return value


# ---------------------------------------------------------------- ddchallenge.json

def check_meta(meta: dict, where: str, fmt: str, spaces: tuple[str, ...]) -> dict:
    """ddchallenge.json's fields that loading and sampling read, checked."""
    if meta.get("format") != fmt:
        raise ModelError(f"{where}: format must be {fmt!r}, got {show(meta.get('format'))}")
    if not isinstance(meta.get("dataset"), str) or not 0 < len(meta["dataset"]) <= 64:
        raise ModelError(f"{where}: dataset must be a dataset name, got {show(meta.get('dataset'))}")
    whole(where, "classes", meta.get("classes"), 1, MAX_CLASSES)
    whole_list(where, "image_shape", meta.get("image_shape"), (3, 3), 1, MAX_SIZE)
    whole(where, "image_shape[0] (channels)", meta["image_shape"][0], 1, MAX_IMAGE_CHANNELS)
    space = choice(where, "space", meta.get("space"), spaces)
    if space == "latent" or meta.get("latent_shape") is not None:
        whole_list(where, "latent_shape", meta.get("latent_shape"), (3, 3), 1, MAX_SIZE)
        whole(where, "latent_shape[0] (channels)", meta["latent_shape"][0], 1, MAX_IMAGE_CHANNELS)
    if isinstance(meta.get("latent_scale"), bool) or not isinstance(meta.get("latent_scale"), (int, float)) \
            or not 0 < meta["latent_scale"] <= 1e4:  # the range refuses NaN, infinities and 10**400 alike
        raise ModelError(f"{where}: latent_scale must be a positive number, got {show(meta.get('latent_scale'))}")
    choice(where, "prediction", meta.get("prediction"), PREDICTIONS)
    whole(where, "step", meta.get("step"), 0, 10**12, optional=True)
    generate_section(meta, where)
    books = obj(where, "codebooks", meta.get("codebooks"), optional=True) or {}
    for name, record in books.items():
        record = obj(where, f"codebooks.{name}", record)
        if record.get("sample_shape") is not None:
            whole_list(where, f"codebooks.{name}.sample_shape", record["sample_shape"], (1, 4), 1, MAX_SIZE)
        for key in ("ipc", "per_class", "seed"):
            if record.get(key) is not None:
                whole(where, f"codebooks.{name}.{key}", record[key], 0, 2**63 - 1)
        for key in ("file", "sha256", "method"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise ModelError(f"{where}: codebooks.{name}.{key} must be text, got {show(record[key])}")
    return meta


def generate_section(meta: dict, where: str) -> tuple[str, dict]:
    """(method, settings) of ddchallenge.json's "generate" section, checked
    for shape only (which methods and settings exist is generators.track2's);
    a folder written before the section existed is plain diffusion."""
    section = meta.get("generate")
    if section is None:
        return "diffusion", {}
    obj(where, "generate", section)
    method = section.get("method")
    if not isinstance(method, str) or not 0 < len(method) <= 64:
        raise ModelError(f"{where}: generate.method must be a method name, got {show(method)}")
    settings = obj(where, "generate.settings", section.get("settings", {}))  # null too: methods read it as an object
    for key, value in settings.items():
        if not (value is None or isinstance(value, (str, int, float, bool))):
            raise ModelError(f"{where}: generate.settings.{key} must be a number or text, got {show(value)}")
    return method, settings


# ---------------------------------------------------------------- diffusers configs

def _estimate(widths: list[int], layers: int) -> int:
    """Parameters of a UNet or VAE with these widths, roughly: 3x3 convolutions
    of each resnet block dominate."""
    return sum(18 * w * w * (2 * layers + 2) for w in widths)


def _groups(where: str, config: dict, widths: list[int]) -> None:
    groups = whole(where, "norm_num_groups", config.get("norm_num_groups"), 1, min(widths))
    if any(w % groups for w in widths):
        raise ModelError(f"{where}: norm_num_groups ({groups}) must divide every entry of block_out_channels "
                         f"({widths})")


def _size(where: str, widths: list[int], layers: int) -> None:
    estimate = _estimate(widths, layers)
    if estimate > MAX_PARAMETERS:
        raise ModelError(f"{where}: block_out_channels {widths} with layers_per_block {layers} make a network of "
                         f"about {estimate / 1e6:.0f} M parameters, more than {MAX_PARAMETERS / 1e6:.0f} M")


def _blocks(where: str, field: str, value, levels: int, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, list) or len(value) != levels or \
            not all(isinstance(v, str) and v in allowed for v in value):
        raise ModelError(f"{where}: {field} must be a list of {levels} (one per level) of "
                         f"{', '.join(allowed)}")


def _merged(cls, config: dict) -> tuple[dict, dict]:
    """The config over the class's defaults, keys the class takes only (what
    diffusers itself would keep), and the defaults."""
    defaults = {name: (list(p.default) if isinstance(p.default, tuple) else p.default)
                for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.default is not inspect.Parameter.empty}
    return {k: config.get(k, d) for k, d in defaults.items()}, defaults


UNET_FREE = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "norm_num_groups", "attention_head_dim", "num_class_embeds")


def unet_config(path: Path) -> dict:
    """unet/config.json, checked: the fields `ddchallenge train` sets within
    bounds, every other field diffusers' default (a folder cannot switch on
    an exotic embedding or block); the dict to pass to `from_config`."""
    from diffusers import UNet2DModel

    where = str(path)
    config, defaults = _merged(UNet2DModel, read_json_object(path))
    whole(where, "sample_size", config["sample_size"], 1, MAX_SIZE)
    whole(where, "in_channels", config["in_channels"], 1, MAX_IMAGE_CHANNELS)
    whole(where, "out_channels", config["out_channels"], 1, MAX_IMAGE_CHANNELS)
    widths = whole_list(where, "block_out_channels", config["block_out_channels"], (1, MAX_LEVELS), 1, MAX_WIDTH)
    _blocks(where, "down_block_types", config["down_block_types"], len(widths), ("DownBlock2D", "AttnDownBlock2D"))
    _blocks(where, "up_block_types", config["up_block_types"], len(widths), ("UpBlock2D", "AttnUpBlock2D"))
    layers = whole(where, "layers_per_block", config["layers_per_block"], 1, MAX_LAYERS)
    _groups(where, config, widths)
    # Heads are width // attention_head_dim at every attention level and in the middle block: at least one.
    attended = [w for w, block in zip(widths, config["down_block_types"]) if block.startswith("Attn")]
    whole(where, "attention_head_dim", config["attention_head_dim"], 1, min([widths[-1], *attended]), optional=True)
    whole(where, "num_class_embeds", config["num_class_embeds"], 1, MAX_CLASSES + 1, optional=True)
    _size(where, widths, layers)
    for key, default in defaults.items():
        if key not in UNET_FREE and config[key] != default:
            raise ModelError(f"{where}: {key} must be {json.dumps(default)} (what `ddchallenge train` writes), got "
                             f"{show(config[key])}")
    return config


def vae_config(path: Path) -> dict:
    """vae/config.json (or a VAE folder's config.json), checked the same way;
    the fields a Stable Diffusion VAE sets are allowed to differ."""
    from diffusers import AutoencoderKL

    where = str(path)
    config, defaults = _merged(AutoencoderKL, read_json_object(path))
    whole(where, "in_channels", config["in_channels"], 1, MAX_IMAGE_CHANNELS)
    whole(where, "out_channels", config["out_channels"], 1, MAX_IMAGE_CHANNELS)
    whole(where, "latent_channels", config["latent_channels"], 1, MAX_IMAGE_CHANNELS)
    widths = whole_list(where, "block_out_channels", config["block_out_channels"], (1, MAX_LEVELS), 1, MAX_WIDTH)
    _blocks(where, "down_block_types", config["down_block_types"], len(widths), ("DownEncoderBlock2D",))
    _blocks(where, "up_block_types", config["up_block_types"], len(widths), ("UpDecoderBlock2D",))
    layers = whole(where, "layers_per_block", config["layers_per_block"], 1, MAX_LAYERS)
    _groups(where, config, widths)
    whole(where, "sample_size", config["sample_size"], 1, 4 * MAX_SIZE)
    choice(where, "act_fn", config["act_fn"], ("silu", "swish", "mish", "gelu", "relu"))
    number(where, "scaling_factor", config["scaling_factor"], 1e-6, 1e4)
    number(where, "shift_factor", config["shift_factor"], -1e4, 1e4, optional=True)
    for key in ("latents_mean", "latents_std"):
        _number_list(where, key, config[key], MAX_IMAGE_CHANNELS)
    for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        flag(where, key, config[key])
    _size(where, widths, layers)
    checked = {"in_channels", "out_channels", "latent_channels", "block_out_channels", "down_block_types",
               "up_block_types", "layers_per_block", "norm_num_groups", "sample_size", "act_fn", "scaling_factor",
               "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
               "mid_block_add_attention"}
    for key, default in defaults.items():
        if key not in checked and config[key] != default:
            raise ModelError(f"{where}: {key} must be {json.dumps(default)}, got {show(config[key])}")
    return config


SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def scheduler_config(path: Path) -> dict:
    """scheduler/scheduler_config.json, checked; only the noise-schedule
    fields are kept (each sampler fills its own from its defaults)."""
    where = str(path)
    raw = read_json_object(path)
    steps = whole(where, "num_train_timesteps", raw.get("num_train_timesteps", 1000), 1, MAX_TRAIN_TIMESTEPS)
    config = {
        "num_train_timesteps": steps,
        "beta_start": number(where, "beta_start", raw.get("beta_start", 0.0001), 0, 1),
        "beta_end": number(where, "beta_end", raw.get("beta_end", 0.02), 0, 1),
        "beta_schedule": choice(where, "beta_schedule", raw.get("beta_schedule", "linear"), SCHEDULES),
        "prediction_type": choice(where, "prediction_type", raw.get("prediction_type"), PREDICTIONS),
        "timestep_spacing": choice(where, "timestep_spacing", raw.get("timestep_spacing", "leading"), SPACINGS),
        "steps_offset": whole(where, "steps_offset", raw.get("steps_offset", 0), 0, steps - 1),
        "clip_sample": flag(where, "clip_sample", raw.get("clip_sample", True)),
        "clip_sample_range": number(where, "clip_sample_range", raw.get("clip_sample_range", 1.0), 1e-6, 1e4),
        "thresholding": flag(where, "thresholding", raw.get("thresholding", False)),
        "dynamic_thresholding_ratio": number(where, "dynamic_thresholding_ratio",
                                             raw.get("dynamic_thresholding_ratio", 0.995), 0, 1),
        "sample_max_value": number(where, "sample_max_value", raw.get("sample_max_value", 1.0), 1e-6, 1e4),
        "rescale_betas_zero_snr": flag(where, "rescale_betas_zero_snr", raw.get("rescale_betas_zero_snr", False)),
        "variance_type": choice(where, "variance_type", raw.get("variance_type", "fixed_small"), VARIANCES),
    }
    betas = raw.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != steps or any(
                isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1 for b in betas):
            raise ModelError(f"{where}: trained_betas must be null or {steps} numbers in (0, 1), one per timestep")
        config["trained_betas"] = betas
    return config


def load_network(cls, folder: Path, config: dict):
    """`cls` built from a checked config, with the weights of the folder's
    safetensors file loaded strictly (every tensor present, every shape equal)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / WEIGHTS
    try:
        st = os.lstat(weights)
    except OSError:
        raise ModelError(f"{folder} has no {WEIGHTS}; a model folder holds its weights as safetensors") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{weights} is not a regular file; a model folder holds plain files only")
    model = cls.from_config(config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights} is not a readable safetensors file ({_first_line(exc)})") from None
    try:
        found = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line] or [_first_line(exc)]
        raise ModelError(f"{weights} does not hold the weights {folder / 'config.json'} describes "
                         f"({lines[0][:300]})") from None
    wrong = [f"missing {k}" for k in found.missing_keys] + [f"unexpected {k}" for k in found.unexpected_keys]
    if wrong:
        raise ModelError(f"{weights} does not hold the weights {folder / 'config.json'} describes ({len(wrong)} "
                         f"tensor(s) differ, first: {wrong[0][:200]})")
    return model.eval()
