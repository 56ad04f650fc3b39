"""Teachers for the soft-label measures (mode M, and `generate --soft-labels
teacher`): a reference ConvNet trained on a dataset's real training images
with a recorded recipe, saved as a folder and read back as untrusted input.

    DIR/teacher.json       what it is: dataset, network, the training recipe and its hash, seed, how many
                           training images, their sha256, its test accuracy, the weights' sha256, version
    DIR/model.safetensors  the network's weights (float32; no pickle)

Training is the challenge's recipe (`train.train_round`: SGD, the lr drop,
DSA) on the whole training set for `epochs` (default TEACHER_EPOCHS), one
round. Loading checks every field of teacher.json and every tensor's name,
shape, dtype, finiteness and magnitude against the network the JSON
describes, and the weights' sha256 against the one recorded; anything else
is a TeacherError.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save as save_safetensors

from ddchallenge import __version__
from ddchallenge.data import data_root, load_reference, load_train, normalise
from ddchallenge.diffusion.folder import ModelError, read_json_object
from ddchallenge.errors import DatasetError, OptionMismatch, OutputExistsError, UsageError
from ddchallenge.evaluation.device import resolve_device
from ddchallenge.evaluation.nets import reference_convnet
from ddchallenge.evaluation.train import accuracy, train_round
from ddchallenge.extras import TEACHER_SETTINGS
from ddchallenge.fileio import OutputMarker, check_replaceable, replace_folder, sha256_bytes
from ddchallenge.protocol import DATASETS, MAX_EPOCHS, MAX_SEED, OFFICIAL, EvalRecipe, check_seed, get_dataset

FORMAT = "ddchallenge-teacher"
VERSION = 1
META, WEIGHTS = "teacher.json", "model.safetensors"
TEACHER_MARKER = OutputMarker(META, f'"format": "{FORMAT}"'.encode())  # what --force may replace
TEACHER_EPOCHS = 50  # our choice (DD-Ranking ships pretrained teachers without a recipe); recorded in each folder
MAX_META_BYTES = 64 << 10
MAX_WIDTH, MAX_DEPTH = 1024, 4  # far past the reference net (128, 3); a hostile width cannot exhaust memory
MAX_WEIGHTS_BYTES = 512 << 20
# Trained teachers' weights lie within +-1.1 (mnist5k, 50 epochs). Bounded at 100, every activation of a ConvNet
# up to MAX_WIDTH x MAX_DEPTH on normalised images stays below ~1e10 (each GroupNorm rescales), so the teacher's
# logits and softmax are finite; finite but huge weights (3e38) would overflow them to NaN targets, and a NaN loss
# trains a network to chance, recorded as if it were a measurement.
MAX_WEIGHT = 100.0
_FIELDS = {"format", "version", "dataset", "width", "depth", "recipe", "recipe_hash", "seed", "train_images",
           "train_sha256", "test_accuracy", "weights_sha256", "ddchallenge_version", "seconds"}


class TeacherError(DatasetError):
    """A teacher folder that is missing, broken, or made for another dataset.
    The organiser's data, like a reference test set: a batch never records
    it as an upload's failure."""


@dataclass(frozen=True)
class Teacher:
    net: torch.nn.Module  # the reference ConvNet in eval mode, on the CPU
    dataset: str
    recipe: EvalRecipe  # how it was trained (one round)
    seed: int
    weights_sha256: str
    test_accuracy: float
    path: Path

    def settings(self) -> dict:
        """What a soft-label measure records of its teacher (flat scalars)."""
        return dict(zip(TEACHER_SETTINGS, (self.dataset, self.recipe.hash(), self.recipe.epochs, self.seed,
                                           self.weights_sha256)))


def teacher_recipe(epochs: int = TEACHER_EPOCHS) -> EvalRecipe:
    return OFFICIAL.with_overrides(epochs=epochs, rounds=1)


def default_folder(dataset: str, recipe: EvalRecipe, seed: int, root: str | os.PathLike | None = None) -> Path:
    """Where `teacher` caches a teacher when not told: under the data root,
    named by dataset, recipe hash and seed."""
    return Path(root or data_root()) / "teachers" / f"{dataset}-{recipe.hash()}-seed{seed}"


def _train_digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def make_teacher(dataset: str, output: str | os.PathLike | None = None, epochs: int = TEACHER_EPOCHS, seed: int = 0,
                 device: str = "auto", root: str | os.PathLike | None = None, force: bool = False,
                 progress: bool = True) -> tuple[Teacher, bool]:
    """Train a teacher on `dataset`'s training images and save it (atomically:
    the folder is built beside `output` and renamed into place); returns it
    and whether it was already there (a folder holding a valid teacher with
    the same dataset, recipe and seed is kept, not trained again)."""
    spec = get_dataset(dataset)
    check_seed(seed)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 0 <= epochs <= MAX_EPOCHS:
        raise UsageError(f"--epochs must be a whole number from 0 to {MAX_EPOCHS}, got {epochs!r}")
    recipe = teacher_recipe(epochs)
    out = Path(output) if output is not None else default_folder(spec.name, recipe, seed, root)
    if os.path.lexists(out) and not force:
        try:
            kept = load_teacher(out)
        except TeacherError:
            kept = None
        if kept is not None and (kept.dataset, kept.recipe.hash(), kept.seed) == (spec.name, recipe.hash(), seed):
            return kept, True
    check_replaceable(out, TEACHER_MARKER)  # a folder of the user's: never replaced, never a --force suggested
    if os.path.lexists(out) and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} holds another teacher than this one ({spec.name}, {epochs} epochs, seed "
                                f"{seed}); pass --force to replace it, or another -o")
    dev = resolve_device(device)
    images, labels = load_train(spec, root)
    ref = load_reference(spec, None if root is None or spec.validation_of else root, root)
    start = time.perf_counter()
    net = train_round(spec, normalise(images, spec), torch.from_numpy(labels), recipe, seed, dev, progress,
                      desc=f"teacher {spec.name}")
    test_acc = accuracy(net, ref["images_val"], ref["labels_val"], recipe.eval_batch_size)
    trained = {"train_images": int(len(labels)), "train_sha256": _train_digest(images, labels),
               "test_accuracy": test_acc, "seconds": round(time.perf_counter() - start, 3)}
    return write_teacher(out, net, spec.name, recipe, seed, trained), False


def write_teacher(out: str | os.PathLike, net: torch.nn.Module, dataset: str, recipe: EvalRecipe, seed: int,
                  trained: dict) -> Teacher:
    """Save `net` (a reference ConvNet of `recipe`'s width and depth) as a
    teacher folder at `out`, replacing what is there; `trained` holds
    train_images, train_sha256, test_accuracy and seconds."""
    out = Path(out)
    weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
    meta = {"format": FORMAT, "version": VERSION, "dataset": dataset, "width": recipe.width, "depth": recipe.depth,
            "recipe": dataclasses.asdict(recipe), "recipe_hash": recipe.hash(), "seed": seed, **trained,
            "weights_sha256": sha256_bytes(weights), "ddchallenge_version": __version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staging.chmod(0o755)
        (staging / WEIGHTS).write_bytes(weights)
        (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        load_teacher(staging)  # what was written reads back as a teacher
        replace_folder(staging, out, TEACHER_MARKER)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_teacher(out)


def _field(meta: dict, name: str, kind, where: str, low=None, high=None):
    value = meta.get(name)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) \
            or (low is not None and not low <= value <= high):
        bounds = f" from {low} to {high}" if low is not None else ""
        what = {int: "a whole number", str: "a text", dict: "an object"}.get(kind, "a number")
        raise TeacherError(f"{where}: {name} must be {what}{bounds}")
    return value


def _recipe(fields: dict, where: str) -> EvalRecipe:
    """The recorded training recipe, each setting of the type EvalRecipe gives it."""
    names = {f.name: f for f in dataclasses.fields(EvalRecipe)}
    if set(fields) != set(names):
        raise TeacherError(f"{where}: recipe must hold exactly the evaluation recipe's settings "
                           f"({', '.join(sorted(names))})")
    for name, f in names.items():
        kind = type(f.default)
        if kind is int:
            _field(fields, name, int, f"{where}: recipe", 0, MAX_EPOCHS)
        elif kind is float:
            _field(fields, name, (int, float), f"{where}: recipe", 0.0, 1e6)
        else:
            _field(fields, name, str, f"{where}: recipe")
            if len(fields[name]) > 200:
                raise TeacherError(f"{where}: recipe.{name} is over 200 characters")
    return EvalRecipe(**fields)


def load_teacher(folder: str | os.PathLike) -> Teacher:
    """A teacher folder read as untrusted input (see the module's doc)."""
    folder = Path(folder)
    hint = "make one with `ddchallenge teacher DATASET -o DIR`"
    if folder.is_symlink() or not folder.is_dir():
        raise TeacherError(f"{folder} is not a teacher folder ({'a link' if folder.is_symlink() else 'no folder'}); "
                           f"{hint}")
    where = str(folder / META)
    if not (folder / META).is_file() and not (folder / META).is_symlink():
        raise TeacherError(f"{folder} is not a teacher folder (no {META} in it); {hint}")
    try:
        meta = read_json_object(folder / META, MAX_META_BYTES)
    except ModelError as exc:
        raise TeacherError(f"{folder} is not a teacher folder: {exc}; {hint}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TeacherError(f"{where} is not a ddchallenge teacher (format {FORMAT!r} version {VERSION}); {hint}")
    unknown = sorted(set(meta) - _FIELDS)
    missing = sorted(_FIELDS - set(meta))
    if unknown or missing:
        raise TeacherError(f"{where}: " + "; ".join(filter(None, [
            f"unknown field(s) {', '.join(unknown[:5])}" if unknown else "",
            f"missing field(s) {', '.join(missing[:5])}" if missing else ""])))
    name = _field(meta, "dataset", str, where)
    if name not in DATASETS:
        raise TeacherError(f"{where}: dataset {name[:64]!r} is not a known dataset")
    spec = DATASETS[name]
    width = _field(meta, "width", int, where, 1, MAX_WIDTH)
    depth = _field(meta, "depth", int, where, 1, MAX_DEPTH)
    seed = _field(meta, "seed", int, where, 0, MAX_SEED)
    test_acc = float(_field(meta, "test_accuracy", (int, float), where, 0.0, 1.0))
    _field(meta, "train_images", int, where, 0, 1 << 40)
    _field(meta, "seconds", (int, float), where, 0.0, 1e9)
    for name in ("train_sha256", "ddchallenge_version"):
        if len(_field(meta, name, str, where)) > 200:
            raise TeacherError(f"{where}: {name} is over 200 characters")
    recipe = _recipe(_field(meta, "recipe", dict, where), where)
    if (recipe.width, recipe.depth) != (width, depth) or meta.get("recipe_hash") != recipe.hash():
        raise TeacherError(f"{where}: recipe, recipe_hash, width and depth disagree; the folder was altered")
    if recipe != teacher_recipe(recipe.epochs):  # the one recipe `ddchallenge teacher` trains with
        raise TeacherError(f"{where}: the recipe is not the challenge's with one round and its own epochs, the only "
                           f"one `ddchallenge teacher` uses; the folder was altered; {hint}")
    weights_sha = _field(meta, "weights_sha256", str, where)
    path = folder / WEIGHTS
    if path.is_symlink() or not path.is_file():
        raise TeacherError(f"{folder} has no {WEIGHTS} (a plain file); {hint}")
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise TeacherError(f"{path} is over {MAX_WEIGHTS_BYTES >> 20} MiB; a teacher's weights are a few MB")
    with open(path, "rb") as fh:
        data = fh.read(MAX_WEIGHTS_BYTES + 1)
    if sha256_bytes(data) != weights_sha:
        raise TeacherError(f"{path} does not match the weights_sha256 in {META}; the folder was altered or is "
                           "incomplete")
    net = reference_convnet(spec, width, depth)
    expected = net.state_dict()
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError):
        raise TeacherError(f"{path} is not a readable safetensors file; {hint}") from None
    if set(tensors) != set(expected):
        raise TeacherError(f"{path} holds other tensors than a {spec.name} ConvNet (width {width}, depth {depth})")
    for key, want in expected.items():
        got = tensors[key]
        if got.dtype != torch.float32 or got.shape != want.shape:
            raise TeacherError(f"{path}: {key} is {got.dtype} {tuple(got.shape)}; expected float32 "
                               f"{tuple(want.shape)}")
        if not torch.isfinite(got).all():
            raise TeacherError(f"{path}: {key} holds NaN or Inf")
        largest = float(got.abs().max()) if got.numel() else 0.0
        if largest > MAX_WEIGHT:
            raise TeacherError(f"{path}: {key} holds a weight of {largest:.3g}; a trained teacher's lie within "
                               f"+-{MAX_WEIGHT:g} (larger ones can overflow its outputs to NaN); the folder was "
                               f"altered; {hint}")
    net.load_state_dict(tensors, strict=True)
    return Teacher(net.eval().requires_grad_(False), spec.name, recipe, seed, weights_sha, test_acc, folder)


class TeacherMismatch(OptionMismatch):
    """--teacher names a teacher of another dataset than the one it would
    label: the command line's mistake (exit 2), never recorded against an
    upload (a batch counts it as refused)."""


def check_teacher_for(teacher: Teacher, dataset: str) -> None:
    """A teacher labels only the dataset it learnt (a validation view's
    teacher is its own: the base's has seen the held-out images)."""
    if teacher.dataset != dataset:
        raise TeacherMismatch(f"the teacher {teacher.path} was trained on {teacher.dataset}, not {dataset}; make one "
                           f"with `ddchallenge teacher {dataset}`")


def label_set(path: str | os.PathLike, teacher: Teacher, device: str = "auto") -> Path:
    """Add the teacher's class probabilities (T = 1, un-augmented images) to
    the labelled set at `path` as its soft labels (`generate --soft-labels
    teacher`); the scorer softens them at its own --temperature."""
    from ddchallenge.evaluation.soft import as_soft_labels, teacher_probabilities
    from ddchallenge.labelled import add_soft_labels, read_labelled_set

    lset = read_labelled_set(path)
    check_teacher_for(teacher, lset.dataset)
    spec = get_dataset(teacher.dataset)
    net = teacher.net.to(resolve_device(device))
    probs = teacher_probabilities(net, normalise(lset.images, spec))
    teacher.net.cpu()
    return add_soft_labels(path, as_soft_labels(probs).numpy(), {"teacher": teacher.settings(), "temperature": 1})


def request_teacher(request) -> Teacher | None:
    """The teacher an `extras.ExtrasRequest` names (mode M), loaded and
    checked to be the one the request was made with (its weights' sha256),
    so that a folder changed during a batch is never used unnoticed."""
    if request.labels != "teacher":
        return None
    if request.teacher is None:
        raise UsageError("--labels teacher needs --teacher DIR (made by `ddchallenge teacher DATASET`)")
    teacher = load_teacher(request.teacher)
    if request.teacher_sha256 is not None and teacher.weights_sha256 != request.teacher_sha256:
        raise TeacherError(f"the teacher {teacher.path} changed since this run began (other weights); run again")
    return teacher


def check_labels_possible(entries, request) -> Teacher | None:
    """Before any training: every dataset of the upload can give the label
    measure asked for (its soft labels; a teacher of the same dataset).
    Returns the teacher (None for mode S or no label measure)."""
    from ddchallenge.evaluation.soft import SoftLabelsMissing, check_temperature, missing_message

    if not request.labels:
        return None
    check_temperature(request.temperature)
    teacher = request_teacher(request)
    for entry in entries:
        if request.labels == "soft" and entry.soft_labels is None:
            raise SoftLabelsMissing(missing_message(entry))
        if teacher is not None:
            check_teacher_for(teacher, entry.spec.name)
    return teacher
