"""``medmim data``: build manifests, write data cards, check a data config.

    medmim data manifest --from folder|csv|decathlon|dicom|npz SOURCE --out manifest.csv [--by-study]
    medmim data card --manifest manifest.csv --out data_cards/name [--licence ... --source ...]
    medmim data card -c CONFIG [key=value ...] --out data_cards/name
    medmim data check -c CONFIG [key=value ...]        # read everything once, list what is skipped
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path

from medmim.errors import DataError

SALT_ENV = "MEDMIM_SALT"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="build manifests, write data cards, check data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)

    m = sub.add_parser("manifest", help="build a manifest (CSV or .jsonl) from a folder tree, CSV, Decathlon "
                       "dataset.json, DICOM folder or MedMNIST npz")
    m.add_argument("--from", dest="kind", required=True, choices=["folder", "csv", "decathlon", "dicom", "npz"])
    m.add_argument("source", help="the folder / CSV / dataset.json / DICOM folder / npz file")
    m.add_argument("--out", required=True, help="manifest to write (.csv or .jsonl); skipped files go to "
                   "<out>.skipped.csv")
    m.add_argument("--modality", default="", choices=["", "ct", "mri", "xray", "generic"])
    m.add_argument("--patient-regex", default=None, help="folder: regex on the file name, group 1 = patient id "
                   "(default: the file's path below SOURCE without suffix: every image its own patient)")
    m.add_argument("--split-dirs", default=None, metavar="FOLDER=SPLIT,...",
                   help="folder: top-level folders that are splits, e.g. 'Training=train,Testing=test' "
                   "(default: read as splits when every top-level folder is named train/training, "
                   "val/valid/validation or test/testing; 'none': the top-level folders are classes)")
    m.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    m.add_argument("--image-col", default="image", help="csv: column holding the image path")
    m.add_argument("--label-col", default="label")
    m.add_argument("--patient-col", default="patient_id")
    m.add_argument("--split-col", default="split")
    m.add_argument("--mask-col", default="mask")
    m.add_argument("--salt", default=None, help=f"dicom: salt for hashing patient ids (default: ${SALT_ENV}, "
                   "else a random salt kept in .medmim_salt beside the manifest; keep it private)")
    m.add_argument("--no-split-time", action="store_true", help="dicom: one row per 4D series, not per time point")
    m.add_argument("--by-study", action="store_true", help="dicom: one row per study (its folder), for multi-sequence "
                   "inputs whose series data.channels picks by SeriesDescription pattern")
    m.set_defaults(handler=cmd_manifest)

    c = sub.add_parser("card", help="write a data card (markdown + JSON) from a manifest or a config")
    c.add_argument("--manifest", default=None, help="manifest to describe (else the data of -c CONFIG)")
    c.add_argument("-c", "--config", default=None, help="YAML config (or a name in configs/)")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.add_argument("--out", required=True, help="output path without suffix: writes OUT.md and OUT.json")
    c.add_argument("--name", default=None)
    c.add_argument("--description", default="")
    c.add_argument("--source", default="", help="where the data comes from (citation, URL)")
    c.add_argument("--licence", default="", help="licence of the data")
    c.add_argument("--label-names", default=None, help='JSON mapping, e.g. \'{"0": "normal", "1": "pneumonia"}\'')
    c.add_argument("--channels", default=None, metavar="NAME,...", help="--manifest with one file per channel: "
                   "the channel names, in order (as data.channels; columns image_<name> or 'image' lists)")
    c.set_defaults(handler=cmd_card)

    k = sub.add_parser("check", help="read every image of a config once (in data.num_workers processes, "
                       "run.num_threads threads); list unreadable files (skipped.csv)")
    k.add_argument("-c", "--config", default=None)
    k.add_argument("overrides", nargs="*", metavar="key=value")
    k.add_argument("--out", default=None, help="skipped.csv path (default: runs/<run.name>/skipped.csv)")
    k.add_argument("--mask", action="store_true", help="also read masks")
    k.set_defaults(handler=cmd_check)
    return p


def run(args) -> int:
    return args.handler(args)


def _salt(args, out: Path) -> str:
    if args.salt:
        return args.salt
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV]
    path = out.parent / ".medmim_salt"
    if path.exists():
        return path.read_text().strip()
    from medmim.io import write_text

    salt = secrets.token_hex(16)
    write_text(path, salt + "\n")
    os.chmod(path, 0o600)
    return salt


def cmd_manifest(args) -> int:
    from medmim.data import builders
    from medmim.data.dataset import write_skipped
    from medmim.data.manifest import write_manifest

    out = Path(args.out)
    if out.suffix not in (".csv", ".jsonl"):
        raise DataError(f"{out}: --out must end in .csv or .jsonl")
    if out.exists() and not args.force:
        raise DataError(f"{out}: exists; pass --force to replace it, or choose another --out")
    if out.is_dir():
        raise DataError(f"{out}: is a folder; --out names the manifest file to write")
    skipped: list[dict] = []
    if args.kind == "folder":
        rows = builders.from_folder(args.source, modality=args.modality, patient_regex=args.patient_regex,
                                    skipped=skipped, split_dirs=builders.parse_split_dirs(args.split_dirs))
    elif args.kind == "csv":
        rows = builders.from_csv(args.source, image_col=args.image_col, label_col=args.label_col,
                                 patient_col=args.patient_col, split_col=args.split_col, mask_col=args.mask_col,
                                 modality=args.modality)
    elif args.kind == "decathlon":
        rows = builders.from_decathlon(args.source)
    elif args.kind == "dicom":
        rows = builders.from_dicom(args.source, salt=_salt(args, out), split_time=not args.no_split_time,
                                   skipped=skipped, by_study=args.by_study)
    else:
        rows = builders.from_npz(args.source, modality=args.modality)
    write_manifest(rows, out, relative_to=out.parent)
    skipped_path = write_skipped(skipped, out.with_name(out.stem + ".skipped.csv"))
    print(f"manifest: {out} ({len(rows)} rows{_summary(rows)})")
    if args.kind == "dicom" and args.by_study:
        from collections import Counter

        found = Counter(d for r in rows for d in r["series_descriptions"].split("; "))
        print("series descriptions: " + ", ".join(f"'{d}' ({n})" for d, n in found.most_common(8))
              + (f", … ({len(found) - 8} more)" if len(found) > 8 else "")
              + "; declare data.channels with a series pattern per channel (docs/data.md)")
    if args.kind == "decathlon" and len(names := builders.decathlon_channels(args.source)) > 1:
        print(f"multi-modality task: its images hold {len(names)} channels (last axis); declare "
              f"data.channels=[{','.join(names)}] (data.channel_axis=-1), see docs/data.md")
    if skipped_path:
        print(f"skipped {len(skipped)} file(s): see {skipped_path}")
    return 0


def _summary(rows: list[dict]) -> str:
    """'; train 400, test 100; classes: glioma, meningioma' -- what the builder found."""
    from collections import Counter

    splits = Counter(r.get("split") or "unsplit" for r in rows)
    names = {}
    for r in rows:
        if r.get("label_name") not in (None, "") and r.get("label") not in (None, ""):
            names.setdefault(r["label"], r["label_name"])
    parts = [", ".join(f"{s} {splits[s]}" for s in ("train", "val", "test", "unsplit") if splits.get(s))]
    if names:
        parts.append("classes: " + ", ".join(f"{k}={names[k]}" for k in sorted(names)))
    return "; " + "; ".join(parts)


def _config_records(config, overrides):
    import torch

    from medmim.config import load_config
    from medmim.data.dataset import prepare_data

    cfg = load_config(config, overrides)
    torch.set_num_threads(cfg.run.num_threads)  # run.num_threads holds for every verb
    bundle = prepare_data(cfg)
    return cfg, bundle


def cmd_card(args) -> int:
    from medmim.data.card import build_card, write_card
    from medmim.data.manifest import read_manifest

    label_names = {}
    if args.label_names:
        try:
            label_names = {str(k): str(v) for k, v in json.loads(args.label_names).items()}
        except (ValueError, AttributeError):
            raise DataError(f"--label-names: not a JSON mapping: {args.label_names!r}") from None
    if args.manifest:
        names = [n.strip() for n in (args.channels or "").split(",") if n.strip()]
        records = read_manifest(args.manifest, names or None)
        name = args.name or Path(args.manifest).stem
        source = args.source or f"manifest {Path(args.manifest).name}"
        extra, dropped, pool = {}, 0, None
        channels = [{"name": n, "preset": None, "series": None} for n in names] or None
    else:
        cfg, bundle = _config_records(args.config, args.overrides)
        records = [r for s in ("train", "val", "test") for r in bundle.split(s)]
        name = args.name or cfg.run.name
        source = args.source or bundle.source
        extra = {"preset": bundle.preset, "spatial_dims": cfg.data.spatial_dims,
                 "config_data": cfg.data.model_dump(mode="json", exclude={"path"})}
        dropped = len(bundle.duplicates)
        pool = bundle.pool_info  # the unlabelled pretraining pool, when data.unlabelled names one
        channels = _channel_entries(cfg.data, bundle.preset)
    for r in records:
        if r.get("label_name") not in (None, "") and r.get("label") not in (None, ""):
            label_names.setdefault(json.dumps(r["label"]), str(r["label_name"]))
    card = build_card(records, name=name, source=source, licence=args.licence, description=args.description,
                      label_names=label_names, extra=extra, duplicates_dropped=dropped, pool=pool,
                      channels=channels)
    md, js = write_card(card, args.out)
    print(f"data card: {md} and {js}")
    return 0


def _channel_entries(dc, preset: str) -> list[dict] | None:
    """data.channels with each channel's resolved intensity preset (None: one grayscale channel)."""
    from medmim.data.presets import channel_entries

    return channel_entries(dc, preset) or None


def cmd_check(args) -> int:
    from medmim.data.dataset import materialize

    cfg, bundle = _config_records(args.config, args.overrides)
    # a disk cache is filled on the way (later runs reuse it); otherwise nothing is kept in memory
    dc = cfg.data if cfg.data.cache == "disk" else cfg.data.model_copy(update={"cache": "none"})
    counts = {}
    for split in ("train", "val", "test"):
        items = materialize(bundle.split(split), dc, bundle.preset, with_mask=args.mask,
                            skipped=bundle.skipped) if bundle.split(split) else []
        counts[split] = len(items)
    out = Path(args.out) if args.out else Path(cfg.run.out_dir) / cfg.run.name / "skipped.csv"
    path = bundle.write_skipped(out)
    summary = {"usable": counts, "skipped": len(bundle.skipped), "preset": bundle.preset}
    if cfg.data.channels:
        summary["channels"] = {c["name"]: c["preset"] for c in _channel_entries(cfg.data, bundle.preset)}
    print(json.dumps(summary))
    if path:
        print(f"skipped files listed in {path}")
    return 0
