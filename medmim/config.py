"""Configs: YAML files validated on load, with `key.sub=value` overrides from the command line.

Every section forbids unknown keys, so a typo is an error that names the key and lists what is
allowed. The resolved config (defaults + file + overrides) is saved in the run directory.
"""

from __future__ import annotations

import difflib
import re
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medmim.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def default_num_threads() -> int:
    """The default ``run.num_threads``: the CPU cores this process may run on (its affinity mask, which
    is what torch sees), capped by ``OMP_NUM_THREADS`` when that is set, so torch never runs more
    threads than there are cores for it."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        n = min(n, int(env))
    return max(1, n)


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # CPU threads (torch intra-op); default: the cores available, capped by OMP_NUM_THREADS. Set it to
    # fix results across machines; data.num_workers processes run one thread each
    num_threads: int = Field(default_factory=default_num_threads, ge=1)
    tensorboard: bool = True  # TensorBoard events in <run>/tb when the tensorboard package is installed


class PhantomConfig(Section):
    out_dir: str = "data/phantoms"
    n_patients: int = Field(120, ge=6)
    images_per_patient: int = Field(2, ge=1)
    size_2d: int = Field(64, ge=16)
    size_3d: int = Field(32, ge=16)
    abnormal_fraction: float = Field(0.5, gt=0, lt=1)
    seed: int = 1234
    # an unlabelled pretraining pool of this many more patients from the same distribution (labels
    # dropped, own seed and patient ids, never overlapping the labelled set); 0 = none. medmim/data/pool.py
    pool_patients: int = Field(0, ge=0)
    pool_seed: int = 4321


class UnlabelledSource(Section):
    """One extra source of images for pretraining only (``data.unlabelled``); labels in it are ignored."""

    path: str  # a folder (images, recursively), a DICOM folder, a manifest (CSV/JSONL) or an npz file
    kind: Literal["auto", "folder", "dicom", "manifest", "npz"] = "auto"
    preset: Optional[str] = None  # intensity preset for this source (default: from modality, else data's preset)
    modality: Optional[Literal["ct", "mri", "xray", "generic"]] = None
    keys: Optional[list[str]] = None  # npz: the arrays to take (default: every *_images array, else all)
    fraction: float = Field(1.0, gt=0, le=1)  # a seeded, nested subset of the source (pool-size curves)
    name: Optional[str] = None  # shown in logs and reports (default: the path's name)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: Optional[str]) -> Optional[str]:
        from medmim.data.presets import PRESETS

        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset '{v}'; allowed: {', '.join(PRESETS)}")
        return v


def _bare_entries(v, key: str):
    """A list of sections given in short form: one entry or a list; a bare string is ``{key: string}``."""
    if isinstance(v, (str, dict)):
        v = [v]
    return [{key: e} if isinstance(e, str) else e for e in v] if isinstance(v, list) else v


class ChannelSpec(Section):
    """One input channel (an MRI sequence, a CT window, a time point): ``data.channels`` lists them in
    order. A manifest row gives each channel as a column ``image_<name>``, or ``image`` as a list (one
    file per channel, in this order), or one multi-channel file (a 4D NIfTI, a Decathlon multi-modality
    task) whose channel axis is ``data.channel_axis``, or a DICOM study folder whose series are picked by
    ``series`` (a SeriesDescription pattern). Every channel is resampled onto the first channel's grid."""

    name: str  # a short name: manifest column image_<name>, reports, export metadata
    preset: Optional[str] = None  # intensity preset of this channel (default: data.preset / the modality's)
    series: Optional[str] = None  # DICOM study: fnmatch pattern on SeriesDescription, case-insensitive

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v or ""):
            raise ValueError(f"channel name {v!r} must be letters, digits, '_', '.', '-'")
        return v

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: Optional[str]) -> Optional[str]:
        return UnlabelledSource._known_preset(v)


class DataConfig(Section):
    source: Literal["phantoms", "medmnist", "manifest"] = "phantoms"
    path: Optional[str] = None  # npz file (medmnist) or manifest CSV/JSONL (manifest)
    spatial_dims: Literal[2, 3] = 2
    image_size: int = Field(32, ge=8)  # side length fed to the network (resized)
    modality: Literal["ct", "mri", "xray", "generic"] = "xray"
    preset: Optional[str] = None  # modality preset name, e.g. "ct_soft_tissue", "mri_zscore"
    # None: inferred from the labels when the data is read (saved in the run's config.yaml)
    num_classes: Optional[int] = Field(None, ge=1)
    # display names, one per class index (None: from the manifest's label_name column, else "0", "1", ...)
    class_names: Optional[list[str]] = None
    task: Literal["classification", "segmentation"] = "classification"
    val_fraction: float = Field(0.15, ge=0, lt=1)  # patient-level, when the source has no split
    test_fraction: float = Field(0.2, ge=0, lt=1)
    pretrain_on_test: bool = False  # test images never reach pretraining unless this is true
    max_train_images: Optional[int] = Field(None, ge=1)  # cap for quick runs
    num_workers: int = Field(0, ge=0)  # processes preparing images, and DataLoader workers for training batches
    cache: Literal["none", "memory", "disk"] = "memory"
    cache_dir: str = "data/cache"  # cache=disk: one sub-folder per hash of the deterministic transforms
    strict: bool = False  # stop at the first unreadable file instead of skipping it
    resize: Literal["pad", "stretch", "none"] = "pad"  # pad: keep the aspect ratio, pad to a square/cube
    orientation: Optional[str] = "RAS"  # 3D volumes are reoriented to this (None: file order)
    target_spacing: Optional[list[float]] = None  # 3D: resample to this voxel size in mm (before resize)
    random_resized_crop: bool = False  # pretraining crop holding crop_scale of the image, resized back
    crop_scale: list[float] = [0.5, 1.0]
    patch_samples: int = Field(0, ge=0)  # pretraining: this many random image_size patches per image
    # augmentation: "batch" runs it on whole batches on the training device (medmim.data.augment), with the
    # distribution of the per-sample MONAI chain; "sample" runs that chain per item in the loader
    augment: Literal["batch", "sample"] = "batch"
    split_file: Optional[str] = None  # patient -> split JSON: written on first use, reused afterwards
    # byte-identical images in two splits (content hash): drop the copies in the later split
    # (train < val < test), refuse to run, or ignore; auto = drop for files, report for in-memory npz data
    duplicates: Literal["auto", "drop", "error", "ignore"] = "auto"
    phantoms: PhantomConfig = PhantomConfig()
    # extra images for pretraining only (folders, DICOM folders, manifests, npz files); content-hashed
    # against val and test, matches dropped and counted (medmim/data/pool.py, docs/pool.md)
    unlabelled: list[UnlabelledSource] = []
    pretrain_on_labelled: bool = True  # pretraining also sees the labelled train+val images
    # multi-channel inputs (MRI sequences...): one entry per channel, a bare name or {name, preset, series};
    # empty = one grayscale channel (docs/multichannel.md)
    channels: list[ChannelSpec] = []
    channel_axis: int = -1  # the channel axis of a multi-channel file (4D NIfTI: -1, the last)
    # augmentation: each channel is zeroed with this probability (never all of them): a missing sequence
    channel_dropout: float = Field(0.0, ge=0, lt=1)
    # cross-validation: K patient-grouped, stratified folds of the non-test images (0: one train/val
    # split); written into data.split_file with the splits; finetune.fold picks the validation fold
    folds: int = Field(0, ge=0)

    @field_validator("channels", mode="before")
    @classmethod
    def _bare_channel_names(cls, v):
        """``channels: [t1, flair]``: a bare name is a channel with every default."""
        return _bare_entries(v, "name")

    @property
    def in_channels(self) -> int:
        """Channels the encoder takes: one per declared channel, else one (grayscale)."""
        return max(1, len(self.channels))

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels] or ["image"]

    @field_validator("unlabelled", mode="before")
    @classmethod
    def _bare_paths(cls, v):
        """``unlabelled: [folder, other.npz]``: a bare path is a source with every default."""
        return _bare_entries(v, "path")

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.source in ("medmnist", "manifest") and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        pool_phantoms = self.source == "phantoms" and self.phantoms.pool_patients > 0
        if not self.pretrain_on_labelled and not (self.unlabelled or pool_phantoms):
            raise ValueError("data.pretrain_on_labelled is false but there is no data.unlabelled source: "
                             "pretraining would see no images")
        if not self.pretrain_on_labelled and self.pretrain_on_test:
            raise ValueError("data.pretrain_on_test needs data.pretrain_on_labelled")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError(f"data.channels repeats a name: {names}")
        if self.channel_dropout > 0:  # checked here, not when fine-tuning starts after a long pretraining
            if self.in_channels < 2:
                raise ValueError(f"data.channel_dropout={self.channel_dropout} needs at least 2 channels in "
                                 f"data.channels (got {self.in_channels}): the only channel of an image is never dropped")
            from medmim.data.augment import independent_drop_rate

            try:
                independent_drop_rate(self.channel_dropout, self.in_channels)
            except ValueError as exc:
                raise ValueError(f"data.channel_dropout: {exc}") from None
        if self.folds == 1:
            raise ValueError("data.folds must be 0 (no cross-validation) or at least 2")
        if self.class_names is not None:
            if len(set(self.class_names)) != len(self.class_names) or not all(self.class_names):
                raise ValueError(f"data.class_names must be distinct non-empty names, got {self.class_names}")
            if self.num_classes is not None and len(self.class_names) != self.num_classes:
                raise ValueError(f"data.class_names has {len(self.class_names)} names but data.num_classes is "
                                 f"{self.num_classes}")
        return self


class EncoderConfig(Section):
    name: Literal["vit_tiny", "vit_small", "vit_base", "resnet18", "resnet50", "convnext_tiny"] = "vit_tiny"
    patch_size: int = Field(4, ge=1)  # ViT patch size
    embed_dim: Optional[int] = Field(None, ge=8)  # ViT overrides for small experiments
    depth: Optional[int] = Field(None, ge=1)
    num_heads: Optional[int] = Field(None, ge=1)
    width: Optional[int] = Field(None, ge=4)  # CNN channels of the first stage (64 in ResNet-18)
    small_input: bool = True  # CNN stem for small images (e.g. 28x28 MedMNIST)
    num_stages: Optional[int] = Field(None, ge=1, le=4)  # CNN stages (3 gives a 7x7 grid at 28x28 with small_input)
    drop_path: float = Field(0.0, ge=0, lt=1)


class OptimSettings(Section):
    epochs: int = Field(10, ge=1)
    # global batch of one forward/backward: under DDP it is split over the ranks, so the same config
    # gives the same batches (and results) on 1 or N processes; the optimizer sees batch_size * grad_accum
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    clip_grad: Optional[float] = Field(None, gt=0)
    # also write checkpoints/last.pt every N optimizer steps inside an epoch (0: at epoch ends only);
    # a resumed run skips the batches it had already consumed
    checkpoint_every_steps: int = Field(0, ge=0)


class PretrainConfig(OptimSettings):
    method: Literal["mae", "spark", "simclr", "none"] = "mae"
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    masking: Literal["random", "block", "noise_low", "noise_high", "noise_band", "loss_guided"] = "random"
    masking_kw: dict[str, Any] = {}  # extra mask-generator options, e.g. {min_block: 4} or {cutoff: 0.2}
    norm_pix_loss: bool = True
    decoder_dim: int = Field(128, ge=8)
    decoder_depth: int = Field(2, ge=1)
    backend: Literal["sparse", "dense"] = "sparse"  # SparK execution backend
    temperature: float = Field(0.2, gt=0)  # SimCLR
    recon_every: int = Field(5, ge=0)  # epochs between reconstruction grids (0: only at the end)
    lr: float = Field(1.5e-3, gt=0)


class FinetuneConfig(OptimSettings):
    mode: Literal["linear", "full"] = "full"
    init: str = "pretrained"  # "pretrained" (this run's export), "scratch", or a weights path
    # public weights (MAE, SparK, timm, torchvision layouts; medmim.models.pretrained): 2D weights into
    # a 3D encoder (--inflate), and fine-tune even when some encoder weights stay unset (--allow-partial)
    init_inflate: bool = False
    init_allow_partial: bool = False
    label_fraction: float = Field(1.0, gt=0, le=1)
    # labels used for model selection: "all" of the val split (the usual benchmark protocol), or
    # "fraction": the val split reduced by label_fraction too (nested, stratified; strict low-label)
    val_labels: Literal["all", "fraction"] = "all"
    layer_decay: float = Field(0.75, gt=0, le=1)
    loss: Literal["ce", "weighted_ce", "focal"] = "ce"
    multilabel: bool = False
    freeze_epochs: int = Field(0, ge=0)  # full mode: train the head alone first
    bootstrap: int = Field(1000, ge=0)  # bootstrap resamples for the test-set 95% CIs (0: none)
    head: Literal["classify", "segment"] = "classify"  # segment: data.task=segmentation, masks needed
    num_seg_classes: int = Field(2, ge=2)  # segmentation classes, background included
    seg_decoder: Literal["auto", "unet", "unetr"] = "auto"  # auto: UNETR for a ViT, UNet for a CNN
    seg_feature_size: int = Field(16, ge=4)  # decoder width
    seg_patch_size: Optional[int] = Field(None, ge=8)  # train on random crops; sliding-window inference
    sw_overlap: float = Field(0.25, ge=0, lt=1)  # sliding-window overlap
    # validation passes per run, at most: spread evenly over the optimizer steps, always after the last
    # one (best-checkpoint selection sees only these); 0 = after every epoch
    max_evals: int = Field(20, ge=0)
    # cross-validation (data.folds = K): this fold is the validation set, the other K-1 train
    fold: Optional[int] = Field(None, ge=0)


class StudyConfig(Section):
    fractions: list[float] = [0.1, 1.0]
    seeds: list[int] = [0]
    # each entry: a pretext name ("mae", "spark", "simclr"), "scratch"/"none", or a weights file;
    # optionally with its own encoder: "spark:resnet18", "mae:vit_tiny", "scratch:resnet18"
    inits: list[str] = ["mae", "scratch"]
    modes: list[Literal["linear", "full"]] = ["full"]
    metric: str = "auroc"
    # extra `key=value` overrides for one init's pretraining and cells, e.g. {"simclr": ["pretrain.lr=1e-3"]}
    overrides: dict[str, list[str]] = {}
    report: bool = True  # write report/index.html at the end
    # fine-tune small fractions for at least this many optimizer steps (more epochs), so that a 1% cell
    # is not judged after a handful of updates; 0 = finetune.epochs for every fraction
    min_steps: int = Field(0, ge=0)
    # cross-validation folds to run (data.folds = K): None = every fold, or only finetune.fold (--fold) when set
    folds: Optional[list[int]] = None

    @field_validator("folds")
    @classmethod
    def _folds_listed(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is None:
            return v
        if not v or any(f < 0 for f in v):
            raise ValueError(f"study.folds must list fold numbers >= 0 (or be null for every fold), got {v}")
        return sorted(set(v))

    @field_validator("inits")
    @classmethod
    def _inits_well_formed(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("study.inits must name at least one initialisation")
        for entry in v:
            method, sep, enc = entry.partition(":")
            if sep and not (method and enc) or (sep and "/" in enc):
                raise ValueError(f"init '{entry}' should look like 'method' or 'method:encoder'")
        if len(set(v)) != len(v):
            raise ValueError(f"study.inits repeats an entry: {v}")
        return v

    @model_validator(mode="after")
    def _overrides_name_inits(self) -> "StudyConfig":
        unknown = [k for k in self.overrides if k not in self.inits]
        if unknown:
            raise ValueError(f"study.overrides names {unknown}, which are not in study.inits {self.inits}")
        return self

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad or not v:
            raise ValueError(f"fractions must be in (0, 1], got {v}")
        return sorted(set(v))


class AnomalyConfig(Section):
    """Reconstruction-based anomaly detection (medmim/anomaly, ``medmim anomaly train|score``).

    The model is trained with ``pretrain.*`` (method, mask ratio, decoder, epochs, lr) on the images
    of the train split whose label is ``normal_label``.
    """

    normal_label: int = 0  # the class trained on; every other label counts as anomalous
    lesion_label: Optional[int] = None  # value of the lesion in pixel masks (None: 3 for 2D, 5 for 3D phantoms)
    num_masks: int = Field(4, ge=1)  # K masks per image at scoring time; their union covers every patch
    mask_ratio: Optional[float] = Field(None, gt=0, lt=1)  # scoring mask ratio (None: pretrain.mask_ratio)
    error: Literal["l2", "l1", "ssim", "texture", "texmim"] = "ssim"  # the detector: squared / absolute /
    # 1 - SSIM reconstruction error, the learned normal-texture atlas (medmim/anomaly/texture.py), or masked
    # texture modelling (medmim/anomaly/texmim.py)
    ssim_sigma: float = Field(1.5, gt=0)  # Gaussian window of SSIM (pixels)
    ssim_data_range: float = Field(1.0, gt=0)
    smooth_sigma: float = Field(1.0, ge=0)  # Gaussian smoothing of the error map (pixels; 0 = off)
    image_score: Literal["mean", "max", "topk"] = "mean"  # error map -> one score per image
    topk_fraction: float = Field(0.05, gt=0, le=1)  # share of the pixels averaged by "topk"
    target_specificity: float = Field(0.95, gt=0, lt=1)  # threshold: this share of normal val images below
    memory: bool = False  # MemMC-MAE-style memory of normal patterns between encoder and decoder
    memory_slots: int = Field(128, ge=2)
    memory_shrink: Optional[float] = Field(None, ge=0)  # hard-shrinkage threshold (None: 1 / slots)
    memory_temperature: float = Field(1.0, gt=0)  # softmax temperature of the slot attention
    memory_entropy_weight: float = Field(2e-4, ge=0)  # weight of the addressing-entropy (sparsity) loss
    texture_sigmas: list[float] = [1.0, 2.0]  # texture atlas: Gaussian blurs bounding its detail bands (pixels)
    texture_pool: int = Field(2, ge=1)  # texture atlas: region edge (pixels / voxels)
    texture_side: Literal["deficit", "excess", "both"] = "deficit"  # texture atlas: less / more detail than normal
    texture_stats: Literal["mean_std", "median_mad"] = "mean_std"  # texture atlas: each region's normal centre
    # and scale: mean / std, or median / 1.4826 MAD (robust to a few unusual normal images)
    texture_top: float = Field(1.0, gt=0, le=1)  # texture atlas: image score = mean of this share of the
    # regions with the highest map (1: all regions)
    # masked texture modelling (anomaly.error: texmim, medmim/anomaly/texmim.py): a small network learns on
    # normal images to predict hidden cells' detail energy (texture_sigmas bands on texture_pool regions)
    texmim_input_sigma: float = Field(2.0, ge=0)  # Gaussian blur of its input (pixels): no detail left to copy
    texmim_mask_ratio: float = Field(0.5, gt=0, lt=1)  # share of cells hidden in training and scoring
    texmim_cell: int = Field(4, ge=1)  # masked cell edge (pixels / voxels), a multiple of texture_pool
    texmim_num_masks: int = Field(4, ge=1)  # covering masks at scoring (more if the ratio needs them)
    texmim_width: int = Field(32, ge=1)  # channels of its convolutions
    texmim_epochs: int = Field(30, ge=1)
    texmim_batch_size: int = Field(64, ge=1)
    texmim_lr: float = Field(2e-3, gt=0)
    texmim_stats: Literal["mean_std", "median_mad"] = "median_mad"  # normal residuals' centre / scale per region
    texmim_top: float = Field(1.0, gt=0, le=1)  # image score: mean of this share of the worst regions
    batch_size: int = Field(64, ge=1)  # images per scoring batch (times num_masks model inputs)
    max_heatmaps: int = Field(24, ge=0)  # heatmap files written per scored split (0: none)


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)  # its thread default is read when a config is made
    data: DataConfig = DataConfig()
    encoder: EncoderConfig = EncoderConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    study: StudyConfig = StudyConfig()
    anomaly: AnomalyConfig = AnomalyConfig()

    @model_validator(mode="after")
    def _patch_grid(self) -> "Config":
        """A ViT cuts the image into patches: the image side must be a multiple of the patch size."""
        enc, size = self.encoder, self.data.image_size
        if self.finetune.fold is not None and not self.finetune.fold < self.data.folds:
            raise ValueError(f"finetune.fold={self.finetune.fold} needs data.folds > {self.finetune.fold} "
                             f"(data.folds is {self.data.folds})")
        if self.study.folds is not None and not max(self.study.folds) < self.data.folds:
            raise ValueError(f"study.folds={self.study.folds} needs data.folds > {max(self.study.folds)} "
                             f"(data.folds is {self.data.folds})")
        if enc.name.startswith("vit") and size % enc.patch_size:
            raise ValueError(f"data.image_size={size} is not divisible by encoder.patch_size={enc.patch_size} "
                             f"(try data.image_size={size - size % enc.patch_size or enc.patch_size})")
        return self


# ----------------------------------------------------------------------------------------------
# loading, overrides, errors


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _section_model(path: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        parent = _section_model(loc[:-1])
        allowed = _allowed_keys(parent)
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{source}: unknown key '{key}'{hint}; allowed here: {', '.join(allowed)}"
    if first["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    given = first.get("input")
    msg = first["msg"]
    if first["type"] == "value_error":  # our own validators: the message names the key(s) already
        msg = msg.removeprefix("Value error, ")
        section_level = not loc or isinstance(given, dict)  # a section's validator: no single key to blame
        return f"{source}: {msg}" if section_level else f"{source}: bad value for '{key}': {msg}"
    shown = repr(given)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{source}: bad value for '{key}': {msg} (got {shown})"


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules: 3 -> int, 0.5 -> float, true -> bool, [1,2] -> list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key part")
        node = raw
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(value)
    return raw


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or a bare name looked up in the project's configs/ folder."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"{path}: config file not found (bundled configs: {', '.join(names)})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the overrides; validated as a whole."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = resolve_config_path(path)
        source = str(p)
        if p.is_dir():
            raise ConfigError(f"{p}: is a folder; -c takes a YAML config file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text file (a YAML config is UTF-8 text)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        raw = loaded
    if overrides:
        raw = apply_overrides(raw, list(overrides))
        source += " + overrides"
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    raw = apply_overrides(cfg.model_dump(mode="json"), overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, "overrides")) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
