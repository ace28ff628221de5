"""``medmim anomaly train`` and ``medmim anomaly score``: the two steps of anomaly detection.

train: the masked-reconstruction model (``pretrain.method`` mae | spark, optionally with memory) is
    trained through the one training loop (``fit`` + ``PretrainTask``) on the train-split images
    whose label is ``anomaly.normal_label``. Then the validation split is scored and, for every error
    kind, the threshold at ``anomaly.target_specificity`` of the normal validation images is chosen.
    Written beside each other in ``runs/<name>/``: ``anomaly_model.safetensors`` (the whole model)
    and ``anomaly_model.json`` (architecture, scoring settings, thresholds, validation metrics).

score: the saved model scores a split: ``scores_<split>/scores.csv`` (one row per image),
    ``metrics.json`` (image AUROC / AP for L2, L1 and 1-SSIM; pixel AUROC / AP / best Dice where
    lesion masks exist; the operating point at the saved threshold), heatmaps (PNG overlays in 2D,
    NIfTI maps in the source geometry in 3D).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medmim.anomaly.baselines import comparison_markdown, comparison_rows, compare_with_baselines, statistic_scores
from medmim.anomaly.metrics import image_metrics, operating_point, pixel_metrics, threshold_at_specificity
from medmim.anomaly.model import build_anomaly_model
from medmim.anomaly.outputs import save_nifti_map, save_overlay_png
from medmim.anomaly.scoring import ERRORS, ScoreSettings, score_items
from medmim.anomaly.texmim import TextureMIM
from medmim.anomaly.texture import TextureAtlas
from medmim.config import Config, load_config
from medmim.data.dataset import DataBundle, deterministic_transforms, describe_failure, make_loader, prepare_data, summarize
from medmim.errors import DataError, MedmimError
from medmim.io import write_csv, write_json, write_text
from medmim.models.export import channel_metadata
from medmim.train.distributed import current as current_dist
from medmim.train.loop import Runtime, fit
from medmim.train.rundir import RunDir, seed_everything
from medmim.train.tasks import PretrainTask

log_ = logging.getLogger("medmim.anomaly")
PASS_KEYS = ("series_id", "frame")  # record keys the reader needs besides the path (DICOM series, frame)
MODEL_NAME = "anomaly_model.safetensors"
ATLAS_NAME = "texture_atlas.safetensors"
TEXMIM_NAME = "texture_mim.safetensors"
# every score kind: the reconstruction errors, the texture atlas, masked texture modelling (the last
# only where anomaly.error chooses it or the run saved one: it trains a network)
KINDS = (*ERRORS, "texture", "texmim")
SIDECAR_NAME = "anomaly_model.json"


# ---- data ---------------------------------------------------------------------------------------
def lesion_label(cfg: Config) -> int | None:
    if cfg.anomaly.lesion_label is not None:
        return cfg.anomaly.lesion_label
    if cfg.data.source == "phantoms":
        from medmim.data.phantoms import phantom_labels

        return phantom_labels(cfg.data)["lesion"]
    return None


def load_split(cfg: Config, data: DataBundle, split: str, *, normal_only: bool = False,
               with_masks: bool = False) -> tuple[list[dict], list[dict]]:
    """Materialised items (``image``, ``label``, optional binary ``lesion``) and one metadata dict per
    item (``source``, ``label``, ``anomalous``). Unreadable files are reported and skipped."""
    records = data.split(split)
    normal = cfg.anomaly.normal_label
    if normal_only:
        records = [r for r in records if r.get("label") is not None and int(r["label"]) == normal]
    use_masks = with_masks and any(r.get("mask") for r in records)
    det_img = deterministic_transforms(cfg.data, data.preset, with_mask=False)
    det_both = deterministic_transforms(cfg.data, data.preset, with_mask=True) if use_masks else None
    lab = lesion_label(cfg)
    items, meta = [], []
    for r in records:
        has_mask = use_masks and bool(r.get("mask"))
        loader_in = {"image": r["image"], **{k: r[k] for k in PASS_KEYS if r.get(k) not in (None, "")}}
        try:
            item = (det_both if has_mask else det_img)({**loader_in, **({"mask": r["mask"]} if has_mask else {})})
        except Exception as exc:  # noqa: BLE001 - a reader failure is reported, then skipped
            info = describe_failure(r, exc)
            if cfg.data.strict:
                raise DataError(f"{info['file']}: {info['reason']}") from None
            log_.warning("skipping %s: %s", info["file"], info["reason"])
            data.skipped.append(info)
            continue
        out = {"image": item["image"].float()}
        if has_mask:
            m = item["mask"][0]
            out["lesion"] = (m.round() == lab) if lab is not None else (m > 0)
        label = r.get("label")
        items.append(out)
        src = r.get("source") or r["image"]
        meta.append({"source": src if isinstance(src, str) else str(src), "label": label,
                     "anomalous": None if label is None else int(label) != normal,
                     "from_file": isinstance(r["image"], (str, Path, list)),  # a list: one file per channel
                     "loader_input": loader_in if isinstance(r["image"], (str, Path, list)) else None})
    return items, meta


# ---- model files --------------------------------------------------------------------------------
def save_model(model: torch.nn.Module, run_dir: Path, sidecar: dict) -> Path:
    from safetensors.torch import save_file

    from medmim.io import atomic_path

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = run_dir / MODEL_NAME
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "medmim-anomaly-v1"})
    write_json(run_dir / SIDECAR_NAME, sidecar)
    return path


def load_model(cfg: Config, run_dir: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    from medmim.train.stages import build_encoder_for

    path = run_dir / MODEL_NAME
    if not path.exists():
        raise MedmimError(f"{path}: no trained anomaly model here; run `medmim anomaly train` first")
    model = build_anomaly_model(cfg, build_encoder_for(cfg))
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MedmimError(f"{path}: weights do not fit the configured model "
                          f"(missing: {list(missing)[:5]}, unexpected: {list(unexpected)[:5]})")
    return model.eval()


def settings_key(s: ScoreSettings, cfg: Config | None = None) -> dict:
    d = asdict(s)
    d.pop("error")  # every error kind is scored; the primary one only picks the CSV's "score"
    if cfg is not None:
        d["texture"] = texture_key(cfg)
        if cfg.anomaly.error == "texmim":
            d["texmim"] = texmim_key(cfg)
    return d


def texture_key(cfg: Config) -> dict:
    a = cfg.anomaly
    return {"sigmas": [float(v) for v in a.texture_sigmas], "pool": a.texture_pool, "side": a.texture_side,
            "stats": a.texture_stats, "top": a.texture_top}


def new_atlas(cfg: Config) -> TextureAtlas:
    """An unfitted atlas with the ``anomaly.texture_*`` settings."""
    k = texture_key(cfg)
    return TextureAtlas(k["sigmas"], k["pool"], k["side"], k["stats"], k["top"])


def texture_atlas(cfg: Config, normals: Callable[[], list[dict]], run_dir: Path | None = None,
                  log: Callable[[str], None] = print) -> TextureAtlas:
    """The run's saved texture atlas when it fits ``anomaly.texture_*``; otherwise one learned now
    from the normal training images (``normals()``, called only then)."""
    key = texture_key(cfg)
    path = run_dir / ATLAS_NAME if run_dir is not None else None
    if path is not None and path.exists():
        atlas = TextureAtlas.load(path, side=key["side"], top=key["top"])
        if atlas.sigmas == key["sigmas"] and atlas.pool == key["pool"] and atlas.stats == key["stats"]:
            return atlas
        log(f"[anomaly] {path.name} was learned with other texture settings: learning the atlas again")
    return new_atlas(cfg).fit(normals())


def texmim_key(cfg: Config) -> dict:
    """The settings a saved masked texture model must have been trained with (``TextureMIM.settings``)."""
    return new_texture_mim(cfg).settings()


def texture_mim(cfg: Config, normals: Callable[[], list[dict]], run_dir: Path | None = None,
                log: Callable[[str], None] = print) -> TextureMIM | None:
    """The masked texture model: the run's saved one when it fits ``anomaly.texmim_*``; otherwise,
    when ``anomaly.error`` is ``texmim``, one trained now on the normal training images (``normals()``,
    called only then); else None."""
    key = texmim_key(cfg)
    path = run_dir / TEXMIM_NAME if run_dir is not None else None
    if path is not None and path.exists():
        model = TextureMIM.load(path, top=cfg.anomaly.texmim_top)
        if model.settings() == key:
            return model
        log(f"[anomaly] {path.name} was trained with other settings")
    if cfg.anomaly.error != "texmim":
        return None
    train_items = normals()
    log(f"[anomaly] training the masked texture model on {len(train_items)} normal images")
    return new_texture_mim(cfg).fit(train_items, log=log)


def new_texture_mim(cfg: Config, untrained: bool = False) -> TextureMIM:
    """An unfitted masked texture model with the ``anomaly.texmim_*`` settings; ``untrained``: with
    0 epochs, so ``fit`` only learns the normal residuals' statistics around the network's random
    initialisation (its sanity baseline, "the same model untrained")."""
    a = cfg.anomaly
    return TextureMIM(a.texture_sigmas, a.texture_pool, input_sigma=a.texmim_input_sigma,
                      mask_ratio=a.texmim_mask_ratio, cell=a.texmim_cell, num_masks=a.texmim_num_masks,
                      width=a.texmim_width, epochs=0 if untrained else a.texmim_epochs,
                      batch_size=a.texmim_batch_size, lr=a.texmim_lr, stats=a.texmim_stats, top=a.texmim_top,
                      seed=cfg.run.seed)


# ---- scoring a split ----------------------------------------------------------------------------
def evaluate_split(model, cfg: Config, items: list[dict], meta: list[dict], runtime: Runtime,
                   keep_maps: bool = True, scorers: tuple = ()) -> tuple[dict, dict]:
    """Score every error kind and every extra scorer given (the texture atlas, the masked texture
    model: anything with ``score_items(items, keep_maps=...)``); return (raw outputs, metrics)."""
    settings = ScoreSettings.from_config(cfg)
    t0 = time.time()
    out = score_items(model, items, settings, batch_size=cfg.anomaly.batch_size, device=runtime.device,
                      errors=ERRORS, keep_maps=keep_maps)
    for scorer in scorers:
        if scorer is not None:
            out.update(scorer.score_items(items, keep_maps=keep_maps))
    metrics: dict = {"n_images": len(items), "score_time_s": round(time.time() - t0, 2)}
    labelled = [i for i, m in enumerate(meta) if m["anomalous"] is not None]
    y = np.array([meta[i]["anomalous"] for i in labelled], dtype=bool)
    metrics["n_anomalous"], metrics["n_normal"] = int(y.sum()), int((~y).sum())
    lesion_idx = [i for i, it in enumerate(items) if "lesion" in it]
    for kind in kinds_in(out):
        s = out[f"{kind}_score"].numpy()
        metrics[kind] = {f"image_{k}": v for k, v in image_metrics(y, s[labelled]).items()}
        if keep_maps and lesion_idx:
            gt = torch.stack([items[i]["lesion"] for i in lesion_idx]).numpy()
            metrics[kind].update(pixel_metrics(gt, out[kind][lesion_idx].numpy()))
            metrics[kind]["n_pixel_images"] = len(lesion_idx)
    return out, metrics


def kinds_in(out: dict) -> list[str]:
    """The score kinds present in ``evaluate_split``'s outputs, in :data:`KINDS` order."""
    return [k for k in KINDS if f"{k}_score" in out]


def _labels(meta: list[dict]) -> tuple[list[int], np.ndarray]:
    labelled = [i for i, m in enumerate(meta) if m["anomalous"] is not None]
    return labelled, np.array([meta[i]["anomalous"] for i in labelled], dtype=bool)


# ---- sanity baselines ---------------------------------------------------------------------------
def untrained_model(cfg: Config) -> torch.nn.Module:
    """The configured anomaly model at its random initialisation (the same seed as training uses)."""
    from medmim.train.stages import build_encoder_for

    seed_everything(cfg.run.seed, cfg.run.num_threads)
    return build_anomaly_model(cfg, build_encoder_for(cfg)).eval()


def baseline_scores(cfg: Config, items: list[dict], runtime: Runtime, untrained: torch.nn.Module,
                    untrained_texmim: TextureMIM | None = None) -> dict[str, np.ndarray]:
    """Every sanity baseline's image scores for ``items``: the image statistics (both signs), the
    untrained model scored like the trained one (``untrained_<error>``) and, when the masked texture
    model is scored, its untrained network (``untrained_texmim``)."""
    out = statistic_scores(items)
    raw = score_items(untrained.to(runtime.device), items, ScoreSettings.from_config(cfg),
                      batch_size=cfg.anomaly.batch_size, device=runtime.device, errors=ERRORS, keep_maps=False)
    out.update({f"untrained_{k}": raw[f"{k}_score"].numpy() for k in ERRORS})
    if untrained_texmim is not None:
        out["untrained_texmim"] = untrained_texmim.score_items(items, keep_maps=False)["texmim_score"].numpy()
    return out


def baseline_comparison(cfg: Config, val: tuple[dict, list[dict], dict], scored: tuple[dict, list[dict], dict],
                        kind: str | None = None) -> dict | None:
    """Compare the detector (the score ``kind``, default the primary ``anomaly.error``) with the
    baselines: chosen on val, reported on the scored split. ``val`` / ``scored``: (detector outputs,
    metadata, baseline scores)."""
    (vout, vmeta, vbase), (out, meta, base) = val, scored
    vl, vy = _labels(vmeta)
    el, ey = _labels(meta)
    if vy.size == 0 or vy.min() == vy.max() or ey.size == 0 or ey.min() == ey.max():
        return None  # no two-class labels: nothing to compare
    kind = kind or cfg.anomaly.error
    det = f"detector_{kind}"
    vs = {det: vout[f"{kind}_score"].numpy()[vl], **{k: v[vl] for k, v in vbase.items()}}
    es = {det: out[f"{kind}_score"].numpy()[el], **{k: v[el] for k, v in base.items()}}
    return compare_with_baselines(det, vy, vs, ey, es, seed=cfg.run.seed)


def _normal_scores(out: dict, meta: list[dict], kind: str) -> np.ndarray:
    s = out[f"{kind}_score"].numpy()
    return np.array([s[i] for i, m in enumerate(meta) if m["anomalous"] is False])


# ---- train --------------------------------------------------------------------------------------
def setup(cfg: Config) -> tuple[RunDir, DataBundle, Runtime]:
    from medmim.train.setup import setup_run

    return setup_run(cfg, record=False)


def train_anomaly(cfg: Config, *, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train on normal images, calibrate thresholds on validation, save model + JSON; return the JSON."""
    from medmim.train.stages import build_encoder_for

    run, data, runtime = setup(cfg)
    run.save_config(cfg)
    run.save_environment(cfg.run.seed, data.fingerprint, {"data": summarize(data)})
    pc, ac = cfg.pretrain, cfg.anomaly
    train_items, _ = load_split(cfg, data, "train", normal_only=True)
    if not train_items:
        raise DataError(f"no training images with label {ac.normal_label} (anomaly.normal_label) in the train split")
    val_normal, _ = load_split(cfg, data, "val", normal_only=True)
    log(f"[anomaly] training {pc.method}{' + memory' if ac.memory else ''} on {len(train_items)} normal "
        f"images (label {ac.normal_label}); {len(val_normal)} normal validation images")
    bs = min(pc.batch_size, len(train_items))
    info = current_dist()
    loader = make_loader(train_items, bs, shuffle=True, seed=cfg.run.seed, drop_last=len(train_items) > bs,
                         rank=info.rank, world_size=info.world_size)
    val_loader = make_loader(val_normal, 256, shuffle=False, seed=cfg.run.seed, rank=info.rank,
                             world_size=info.world_size) if val_normal else None
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    model = build_anomaly_model(cfg, build_encoder_for(cfg))
    if getattr(model, "norm_pix_loss", False):
        log("[anomaly] note: pretrain.norm_pix_loss=true: each hidden patch's reconstruction is "
            "rescaled with that patch's own mean and std at scoring time (only its structure is predicted)")
    t0 = time.time()
    fit(PretrainTask(model), loader, pc, run, runtime, val_loader=val_loader, monitor=None, resume=resume,
        stage="anomaly:train", log=log)
    train_time = time.time() - t0
    atlas = new_atlas(cfg).fit(train_items)
    texmim = texture_mim(cfg, lambda: train_items, log=log)
    if run.writer:
        atlas.save(run.path / ATLAS_NAME)
        if texmim is not None:
            texmim.save(run.path / TEXMIM_NAME)

    # calibrate on the validation split (all labels; the threshold uses the normal images only)
    val_items, val_meta = load_split(cfg, data, "val", with_masks=True)
    sidecar = {
        "format": "medmim-anomaly-v1", "method": pc.method, "memory": ac.memory,
        "architecture": cfg.encoder.name, "encoder_config": cfg.encoder.model_dump(),
        "spatial_dims": cfg.data.spatial_dims, "image_size": cfg.data.image_size,
        "in_channels": cfg.data.in_channels, "channels": channel_metadata(cfg.data, data.preset),
        "normal_label": ac.normal_label, "n_train_normal": len(train_items),
        "data_source": data.source, "data_fingerprint": data.fingerprint, "seed": cfg.run.seed,
        "train_time_s": round(train_time, 1), "settings": settings_key(ScoreSettings.from_config(cfg), cfg),
        "primary_error": ac.error, "target_specificity": ac.target_specificity,
    }
    model.to(runtime.device)
    if val_items:
        out, metrics = evaluate_split(model, cfg, val_items, val_meta, runtime, scorers=(atlas, texmim))
        thresholds = {}
        for kind in kinds_in(out):
            ns = _normal_scores(out, val_meta, kind)
            if ns.size:
                thresholds[kind] = threshold_at_specificity(ns, ac.target_specificity)
        sidecar.update({"thresholds": thresholds, "threshold": thresholds.get(ac.error),
                        "threshold_source": f"val split, {int((~np.array([m['anomalous'] for m in val_meta], bool)).sum())} "
                                            f"normal images, specificity {ac.target_specificity}",
                        "val_metrics": metrics})
        log("[anomaly] validation: " + ", ".join(
            f"{k} image AUROC {metrics[k]['image_auroc']:.3f}" for k in kinds_in(out)))
        vbase = baseline_scores(cfg, val_items, runtime, untrained_model(cfg),
                                None if texmim is None else new_texture_mim(cfg, untrained=True).fit(train_items))
        cmp = baseline_comparison(cfg, (out, val_meta, vbase), (out, val_meta, vbase))
        if cmp is not None:
            sidecar["val_baselines"] = cmp
            log("[anomaly] sanity baselines on the validation split (chosen and reported on val):\n"
                + comparison_markdown(cmp, "val"))
    else:
        sidecar.update({"thresholds": {}, "threshold": None, "threshold_source": "no validation split"})
        log("[anomaly] no validation split: no threshold chosen")
    if run.writer:
        save_model(model.cpu(), run.path, sidecar)
    log(f"[anomaly] model: {run.path / MODEL_NAME} (+ {SIDECAR_NAME})")
    return sidecar


# ---- score --------------------------------------------------------------------------------------
def score_anomaly(run_dir: str | Path, overrides: list[str] | None = None, *, split: str = "test",
                  out_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Score ``split`` with the model saved in ``run_dir`` (its resolved config + ``overrides``)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise MedmimError(f"{cfg_path}: not an anomaly run directory (no config.yaml)")
    cfg = load_config(cfg_path, overrides)
    sidecar_path = run_dir / SIDECAR_NAME
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else {}
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    data = prepare_data(cfg)
    runtime = Runtime.from_config(cfg.run)
    model = load_model(cfg, run_dir).to(runtime.device)
    # the normal training images, loaded once and only if a detector must be learned now
    normals = functools.cache(lambda: load_split(cfg, data, "train", normal_only=True)[0])
    scorers = (texture_atlas(cfg, normals, run_dir, log=log), texture_mim(cfg, normals, run_dir, log=log))
    settings = ScoreSettings.from_config(cfg)
    thresholds = dict(sidecar.get("thresholds") or {})
    threshold_note = sidecar.get("threshold_source", "")
    items, meta = load_split(cfg, data, split, with_masks=True)
    if not items:
        raise DataError(f"split '{split}' holds no images")
    out, metrics = evaluate_split(model, cfg, items, meta, runtime, scorers=scorers)
    # the validation split: the baselines are chosen there (and thresholds re-chosen if needed)
    if split == "val":
        val_items, val_meta, vout = items, meta, out
    else:
        val_items, val_meta = load_split(cfg, data, "val")
        vout = evaluate_split(model, cfg, val_items, val_meta, runtime, keep_maps=False, scorers=scorers)[0] \
            if val_items else None
    if thresholds and vout is not None and sidecar.get("settings") != settings_key(settings, cfg):
        # the saved thresholds belong to other scoring settings: choose them again on validation
        thresholds = {k: threshold_at_specificity(_normal_scores(vout, val_meta, k), cfg.anomaly.target_specificity)
                      for k in kinds_in(vout) if _normal_scores(vout, val_meta, k).size}
        threshold_note = "re-chosen on the val split: scoring settings differ from the saved ones"
        log(f"[anomaly] {threshold_note}")
    cmp = None
    if vout is not None:
        untrained = untrained_model(cfg)
        untrained_tm = None
        if scorers[1] is not None:
            untrained_tm = new_texture_mim(cfg, untrained=True).fit(normals())
        base = baseline_scores(cfg, items, runtime, untrained, untrained_tm)
        vbase = base if split == "val" else baseline_scores(cfg, val_items, runtime, untrained, untrained_tm)
        cmp = baseline_comparison(cfg, (vout, val_meta, vbase), (out, meta, base))
        if cmp is not None:  # every other score kind against the same baselines, one line each
            cmp["other_detectors"] = {}
            for kind in (k for k in kinds_in(out) if k != cfg.anomaly.error):
                c = baseline_comparison(cfg, (vout, val_meta, vbase), (out, meta, base), kind)
                cmp["other_detectors"][kind] = {"auroc": c["detector"], "difference": c["difference"],
                                                "beats_best_baseline": c["beats_best_baseline"]}
    if cmp is None:
        log("[anomaly] note: no sanity-baseline comparison (the val and scored splits need both normal and "
            "anomalous labels)")
    primary = cfg.anomaly.error
    thr = thresholds.get(primary)
    labelled = [i for i, m in enumerate(meta) if m["anomalous"] is not None]
    if thr is not None and labelled:
        y = np.array([meta[i]["anomalous"] for i in labelled], bool)
        for kind in kinds_in(out):
            if kind in thresholds:
                metrics[kind]["operating_point"] = operating_point(
                    y, out[f"{kind}_score"].numpy()[labelled], thresholds[kind])
    metrics.update({"split": split, "primary_error": primary, "settings": asdict(settings),
                    "threshold": thr, "threshold_note": threshold_note, "run_dir": str(run_dir)})

    dest = Path(out_dir) if out_dir else run_dir / f"scores_{split}"
    rows = []
    for i, m in enumerate(meta):
        row = {"index": i, "source": m["source"], "label": m["label"],
               "anomalous": "" if m["anomalous"] is None else int(m["anomalous"])}
        for kind in kinds_in(out):
            row[f"score_{kind}"] = f"{float(out[f'{kind}_score'][i]):.6g}"
        row["score"] = row[f"score_{primary}"]
        row["predicted_anomalous"] = "" if thr is None else int(float(out[f"{primary}_score"][i]) > thr)
        rows.append(row)
    write_csv(dest / "scores.csv", rows)
    if cmp is not None:
        metrics["baselines"] = cmp
        write_csv(dest / "baselines.csv", comparison_rows(cmp))
        write_text(dest / "baselines.md", f"# Detector vs sanity baselines ({split} split)\n\n"
                   + comparison_markdown(cmp, split))
    _write_heatmaps(cfg, dest, items, meta, out[primary], primary, data.preset)
    write_json(dest / "metrics.json", metrics)
    log(f"[anomaly] {split}: {len(items)} images -> {dest}")
    for kind in kinds_in(out):
        mk = metrics[kind]
        extra = f", pixel AUROC {mk['pixel_auroc']:.3f}, best Dice {mk['pixel_best_dice']:.3f}" \
            if "pixel_auroc" in mk else ""
        log(f"  {kind:>4}: image AUROC {mk['image_auroc']:.3f}, AP {mk['image_ap']:.3f}{extra}")
    if cmp is not None:
        log(f"[anomaly] sanity baselines (chosen on val, reported on {split}):\n" + comparison_markdown(cmp, split))
    return metrics


def _pick_heatmaps(meta: list[dict], n: int) -> list[int]:
    """Up to ``n`` images: half anomalous and half normal where both exist, topped up with the rest."""
    if n <= 0:
        return []
    anomalous = [i for i, m in enumerate(meta) if m["anomalous"] is True]
    rest = [i for i, m in enumerate(meta) if m["anomalous"] is not True]
    pick = anomalous[: n // 2] + rest[: n - min(n // 2, len(anomalous))]
    pick += [i for i in anomalous[n // 2:] if len(pick) < n]
    return sorted(pick[:n])


def _write_heatmaps(cfg: Config, dest: Path, items, meta, maps: torch.Tensor, kind: str, preset: str) -> None:
    chosen = _pick_heatmaps(meta, cfg.anomaly.max_heatmaps)
    if not chosen:
        return
    vmax = float(maps.flatten().quantile(0.999)) if maps.numel() < 16_000_000 else float(maps.max())
    for i in chosen:
        tag = "x" if meta[i]["anomalous"] is None else ("anomalous" if meta[i]["anomalous"] else "normal")
        if cfg.data.spatial_dims == 2:
            lesion = items[i]["lesion"].numpy() if "lesion" in items[i] else None
            save_overlay_png(dest / "heatmaps" / f"{i:05d}_{tag}.png", items[i]["image"][0].numpy(),
                             maps[i].numpy(), lesion=lesion, vmax=vmax,
                             title=f"#{i} {tag}, {kind} map")
        else:
            save_nifti_map(dest / "maps" / f"{i:05d}_{tag}.nii.gz", maps[i], meta[i]["loader_input"], cfg.data,
                           preset)
