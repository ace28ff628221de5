"""`medmim evaluate`: a fine-tuned run's best checkpoint on one split of its own data.

The run is found as ``medmim predict`` finds it (``runs/<name>``, ``runs/<name>/finetune``,
``runs/<name>/segment``, a study cell); its own ``config.yaml`` and recorded intensity preset
define the data and the deterministic chain (``medmim.data.dataset.deterministic_transforms``),
so evaluate and predict give the same per-image probabilities. Overrides (``key=value``) apply to
this evaluation only: nothing is ever written into the run; results go to ``--out`` (default
``<run.out_dir>/evaluations/<run name>-<stage>-<split>``, beside the run), never inside the run.

Classification writes ``predictions.csv`` (one row per image: file, true and predicted class
names, the probability of every class), ``confusion_matrix.csv`` / ``.png``, ``per_class.csv``
(sensitivity, specificity, precision, F1, AUROC per class, each with a bootstrap 95% CI over the
images) and ``metrics.json`` (AUROC, AP, accuracy, balanced accuracy with CIs, and the per-class
table). Segmentation writes ``cases.csv`` (Dice and HD95 per image and foreground class, MONAI
metrics on the model's grid) and ``metrics.json`` (per-class and mean Dice / HD95 with bootstrap
95% CIs over the images).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medmim.config import dump_config, with_overrides
from medmim.errors import DataError, MedmimError
from medmim.io import write_csv, write_json, write_text
from medmim.progress import ProgressBar
from medmim.data.labels import class_names
from medmim.data.manifest import case_name
from medmim.predict import find_run, load_run_model

PER_CLASS = ("sensitivity", "specificity", "precision", "f1")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _bootstrap_rows(values: np.ndarray, n: int, seed: int, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` over cases (NaN entries ignored)."""
    values = np.asarray(values, dtype=np.float64)
    if not n or not np.isfinite(values).any():
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n):
        v = values[rng.integers(0, len(values), len(values))]
        v = v[np.isfinite(v)]
        if v.size:
            means.append(v.mean())
    low, high = np.quantile(np.asarray(means), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _decisions(probs: np.ndarray, multilabel: bool) -> np.ndarray:
    """(N, K) bool: the predicted class per image (single-label: argmax; multi-label: p >= 0.5)."""
    if multilabel:
        return probs >= 0.5
    return np.eye(probs.shape[1], dtype=bool)[probs.argmax(1)]


def _truth(labels: np.ndarray, k: int, multilabel: bool) -> np.ndarray:
    if multilabel:
        return labels.astype(bool)
    return np.eye(k, dtype=bool)[labels.astype(np.int64)]


def per_class_value(name: str, c: int, multilabel: bool) -> Callable[[np.ndarray, np.ndarray], float]:
    """``f(labels, probs)``: sensitivity / specificity / precision / F1 of class ``c`` (one vs rest)."""
    def f(labels, probs):
        t = _truth(labels, probs.shape[1], multilabel)[:, c]
        d = _decisions(probs, multilabel)[:, c]
        tp, fp, fn, tn = (int((t & d).sum()), int((~t & d).sum()), int((t & ~d).sum()), int((~t & ~d).sum()))
        ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
        if name == "sensitivity":
            return ratio(tp, tp + fn)
        if name == "specificity":
            return ratio(tn, tn + fp)
        if name == "precision":
            return ratio(tp, tp + fp)
        return ratio(2 * tp, 2 * tp + fp + fn)  # f1
    f.__name__ = f"{name}_class{c}"
    return f


def classification_report(labels: np.ndarray, probs: np.ndarray, names: list[str], *, multilabel: bool,
                          n_boot: int, seed: int) -> tuple[dict, list[dict], np.ndarray]:
    """(overall metrics with CIs, per-class rows with CIs, confusion matrix)."""
    from medmim.eval.metrics import CLASSIFICATION_METRICS, bootstrap_cis, classification_metrics

    k = probs.shape[1]
    overall = classification_metrics(labels, probs, multilabel=multilabel)
    fns = [per_class_value(m, c, multilabel) for c in range(k) for m in PER_CLASS]
    wanted = list(CLASSIFICATION_METRICS) + [f"auroc_class{c}" for c in range(k) if f"auroc_class{c}" in overall] + fns
    cis = bootstrap_cis(labels, probs, wanted, n=max(n_boot, 1), seed=seed, multilabel=multilabel)
    if not n_boot:
        cis = {key: {**v, "low": float("nan"), "high": float("nan")} for key, v in cis.items()}
    out = {m: overall[m] for m in CLASSIFICATION_METRICS}
    for m in CLASSIFICATION_METRICS:
        out[f"{m}_ci_low"], out[f"{m}_ci_high"] = cis[m]["low"], cis[m]["high"]
    truth, dec = _truth(labels, k, multilabel), _decisions(probs, multilabel)
    rows = []
    for c in range(k):
        row = {"class": c, "name": names[c], "n": int(truth[:, c].sum())}
        for m in PER_CLASS:
            ci = cis[f"{m}_class{c}"]
            row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = ci["value"], ci["low"], ci["high"]
        key = f"auroc_class{c}"
        if key in cis:
            row["auroc"], row["auroc_ci_low"], row["auroc_ci_high"] = cis[key]["value"], cis[key]["low"], cis[key]["high"]
        elif k == 2 and not multilabel:  # binary: one AUROC for both classes
            row["auroc"], row["auroc_ci_low"], row["auroc_ci_high"] = out["auroc"], out["auroc_ci_low"], out["auroc_ci_high"]
        rows.append(row)
    if multilabel:  # per label: tp, fp, fn, tn
        cm = np.array([[int((truth[:, c] & dec[:, c]).sum()), int((~truth[:, c] & dec[:, c]).sum()),
                        int((truth[:, c] & ~dec[:, c]).sum()), int((~truth[:, c] & ~dec[:, c]).sum())]
                       for c in range(k)])
    else:
        from sklearn.metrics import confusion_matrix

        cm = confusion_matrix(labels.astype(np.int64), probs.argmax(1), labels=list(range(k)))
    return out, rows, cm


def plot_confusion(cm: np.ndarray, names: list[str], path: Path, multilabel: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["TP", "FP", "FN", "TN"] if multilabel else names
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 1.0 + 0.6 * len(names)), dpi=110)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("count" if multilabel else "predicted")
    ax.set_ylabel("label" if multilabel else "true")
    top = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    from medmim.eval.plots import save_figure

    return save_figure(fig, path)


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.6g}" if isinstance(v, float) else str(v)


def evaluate_run(run_dir: str | Path, *, split: str = "test", out_dir: str | Path | None = None,
                 overrides: list[str] | None = None, device: str | None = None, progress: bool = True,
                 err=None, log: Callable[[str], None] = print) -> dict:
    """Evaluate the run's best checkpoint on ``split``; write the tables to ``out_dir``; return metrics."""
    from medmim.data.dataset import _item_of, describe_failure, deterministic_transforms, prepare_data
    from medmim.train.loop import Runtime
    from medmim.train.rundir import seed_everything
    from medmim.train.segment import sliding_window_logits

    err = err or sys.stderr
    run_dir = Path(run_dir)
    ckpt, cfg, preset = find_run(run_dir)
    stage_dir = ckpt.parent.parent
    run_root = next(d for d in (stage_dir, stage_dir.parent, stage_dir.parent.parent) if (d / "config.yaml").exists())
    if overrides:
        cfg = with_overrides(cfg, list(overrides))
        if any(o.split("=", 1)[0].strip() == "data.preset" for o in overrides) and cfg.data.preset:
            preset = cfg.data.preset
    if device:
        cfg = with_overrides(cfg, [f"run.device={device}"])
    out = Path(out_dir) if out_dir else \
        Path(cfg.run.out_dir) / "evaluations" / f"{cfg.run.name}-{stage_dir.name}-{split}"
    if _inside(out, run_root) or _inside(out, stage_dir):
        raise MedmimError(f"{out}: inside the run being evaluated ({run_root}); evaluate never writes into a run, "
                          "choose another --out")
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    runtime = Runtime.from_config(cfg.run)
    model = load_run_model(ckpt, cfg).to(runtime.device).eval()  # before any data is touched: fail fast
    data = prepare_data(cfg)
    records = data.split(split)
    if not records:
        raise DataError(f"split '{split}' of {data.source} holds no images")
    segment = cfg.finetune.head == "segment"
    if segment and not any(r.get("mask") for r in records):
        raise DataError(f"split '{split}' of {data.source} has no masks to evaluate the segmentation against")
    chain = deterministic_transforms(cfg.data, preset, with_mask=segment)
    size = cfg.data.image_size
    patch = cfg.finetune.seg_patch_size
    roi = (patch,) * cfg.data.spatial_dims if patch and patch < size else None
    batch_size = 32 if cfg.data.spatial_dims == 3 else 128

    kept: list[dict] = []
    probs: list[np.ndarray] = []
    dice_rows: list[list[float]] = []
    hd_rows: list[list[float]] = []
    skipped: list[dict] = []
    pending: list[tuple[dict, dict]] = []

    @torch.no_grad()
    def flush() -> None:
        if not pending:
            return
        x = torch.stack([it["image"] for _r, it in pending]).to(runtime.device)
        with runtime.autocast():
            if segment:
                logits = sliding_window_logits(model, x, roi, cfg.finetune.sw_overlap).float()
            else:
                logits = model(x).float()
        if segment:
            from medmim.eval.metrics import segmentation_case_metrics

            target = torch.stack([it["mask"] for _r, it in pending])[:, 0].long()
            m = segmentation_case_metrics(logits.argmax(1).cpu(), target, cfg.finetune.num_seg_classes, hd95=True)
            dice_rows.extend(m["dice"])
            hd_rows.extend(m["hd95"])
        else:
            p = torch.sigmoid(logits) if cfg.finetune.multilabel else logits.softmax(1)
            probs.extend(p.cpu().numpy().astype(np.float64))
        kept.extend(r for r, _it in pending)
        pending.clear()

    with ProgressBar(len(records), f"evaluate {split}", enabled=progress, file=err) as bar:
        for r in records:
            item = _item_of(r, segment)
            if item is None:  # segmentation row without a mask
                skipped.append({"file": str(r.get("source") or case_name(r)), "reason": "no mask"})
            else:
                try:
                    pending.append((r, chain(item)))
                except Exception as exc:  # noqa: BLE001 - a reader failure is reported, then skipped
                    info = describe_failure(r, exc)
                    if cfg.data.strict:
                        raise DataError(f"{info['file']}: {info['reason']} (data.strict is true)") from None
                    skipped.append(info)
                if len(pending) >= batch_size:
                    flush()
            bar.advance()
        flush()
    if not kept:
        raise DataError(f"split '{split}': no usable images"
                        + (f" (first: {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""))
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump_config(cfg))
    if skipped:
        write_csv(out / "skipped.csv", skipped, ["file", "reason"])
        log(f"skipped {len(skipped)} unusable image(s); see {out / 'skipped.csv'}")
    n_boot = cfg.finetune.bootstrap
    seed = cfg.run.seed
    result: dict = {"run": str(run_dir), "checkpoint": str(ckpt), "split": split, "n": len(kept),
                    "skipped": len(skipped), "preset": preset, "bootstrap": n_boot}
    files = [str(r.get("source") or case_name(r)) for r in kept]  # multi-channel: the first channel's file
    if segment:
        dice, hd = np.asarray(dice_rows, np.float64), np.asarray(hd_rows, np.float64)
        k = dice.shape[1]
        per_class = []
        for c in range(k):
            row = {"class": c + 1}
            for name, arr in (("dice", dice[:, c]), ("hd95", hd[:, c])):
                finite = arr[np.isfinite(arr)]
                row[name] = float(finite.mean()) if finite.size else float("nan")
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = _bootstrap_rows(arr, n_boot, seed + c)
                row[f"{name}_n"] = int(finite.size)
            per_class.append(row)
        from medmim.eval.metrics import summarize_segmentation

        result.update(summarize_segmentation(dice, hd, n_boot=n_boot, seed=seed))
        result["per_class"] = per_class
        case_cols = ["file"] + [f"dice_class{c + 1}" for c in range(k)] + [f"hd95_class{c + 1}" for c in range(k)]
        cases = [{"file": f, **{f"dice_class{c + 1}": _fmt(float(dice[i, c])) for c in range(k)},
                  **{f"hd95_class{c + 1}": _fmt(float(hd[i, c])) for c in range(k)}} for i, f in enumerate(files)]
        write_csv(out / "cases.csv", cases, case_cols)
        cols = ["class"] + [f"{m}{s}" for m in ("dice", "hd95") for s in ("", "_ci_low", "_ci_high", "_n")]
        write_csv(out / "per_class.csv", [{k2: _fmt(v) for k2, v in r.items()} for r in per_class], cols)
        log(f"{split}: {len(kept)} images, Dice {result['dice']:.4f}"
            + (f" [{result.get('dice_ci_low', float('nan')):.4f}, {result.get('dice_ci_high', float('nan')):.4f}]"
               if n_boot else "") + f", HD95 {result.get('hd95', float('nan')):.3f}")
    else:
        p = np.stack(probs)
        names = class_names(cfg)
        multilabel = cfg.finetune.multilabel
        labelled = [i for i, r in enumerate(kept) if r.get("label") not in (None, "")]
        rows = []
        for i, (r, f) in enumerate(zip(kept, files)):
            row = {"file": f, "series_id": r.get("series_id") or "", "frame": "" if r.get("frame") in (None, "")
                   else r["frame"], **{f"prob_{n}": f"{p[i, c]:.6f}" for c, n in enumerate(names)}}
            label = r.get("label")
            if multilabel:
                row["label"] = "" if label in (None, "") else ";".join(names[c] for c, v in enumerate(label) if v)
                row["predicted"] = ";".join(names[c] for c in range(len(names)) if p[i, c] >= 0.5)
            else:
                row["label"] = "" if label in (None, "") else names[int(label)]
                row["predicted"] = names[int(p[i].argmax())]
            rows.append(row)
        cols = ["file"] + (["series_id"] if any(r["series_id"] for r in rows) else []) \
            + (["frame"] if any(r["frame"] != "" for r in rows) else []) + ["label", "predicted"] \
            + [f"prob_{n}" for n in names]
        write_csv(out / "predictions.csv", rows, cols)
        if labelled:
            y = np.array([kept[i]["label"] for i in labelled], dtype=np.float64 if multilabel else np.int64)
            overall, per_class, cm = classification_report(y, p[labelled], names, multilabel=multilabel,
                                                           n_boot=n_boot, seed=seed)
            result.update(overall)
            result["per_class"] = per_class
            result["confusion_matrix"] = cm.tolist()
            if multilabel:
                cm_rows = [{"label": names[c], "TP": v[0], "FP": v[1], "FN": v[2], "TN": v[3]} for c, v in enumerate(cm)]
                write_csv(out / "confusion_matrix.csv", cm_rows, ["label", "TP", "FP", "FN", "TN"])
            else:
                cm_rows = [{"true \\ predicted": names[i], **{names[j]: int(cm[i, j]) for j in range(len(names))}}
                           for i in range(len(names))]
                write_csv(out / "confusion_matrix.csv", cm_rows, ["true \\ predicted", *names])
            plot_confusion(cm, names, out / "confusion_matrix.png", multilabel=multilabel)
            pc_cols = ["class", "name", "n"] + [f"{m}{s}" for m in (*PER_CLASS, "auroc")
                                                for s in ("", "_ci_low", "_ci_high")]
            write_csv(out / "per_class.csv", [{k2: _fmt(v) for k2, v in r.items()} for r in per_class], pc_cols)
            log(f"{split}: {len(labelled)} labelled images, AUROC {overall['auroc']:.4f}"
                + (f" [{overall['auroc_ci_low']:.4f}, {overall['auroc_ci_high']:.4f}]" if n_boot else "")
                + f", accuracy {overall['accuracy']:.4f}")
        else:
            log(f"{split}: {len(kept)} images without labels: predictions only")
    write_json(out / "metrics.json", result)
    log(f"results: {out}")
    return result

