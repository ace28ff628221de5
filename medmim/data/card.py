"""Data cards: what a data set holds, written as markdown + JSON from a manifest or a config.

A card has counts per split and class (images and patients), modality, the input channels (names
and intensity presets, ``data.channels``), image size and voxel
spacing histograms (read from headers, not pixels), source and licence fields, the records'
fingerprint, and, for DICOM inputs, a PHI scan that lists WHICH identifying tags are filled in how
many files. Values of those tags are never read into the card.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medmim.data.manifest import records_fingerprint
from medmim.data.readers import NIFTI, NPZ_REF, RASTER, SITK, _is_dicom, _suffix, npz_entry
from medmim.errors import DataError
from medmim.io import write_json, write_text

MAX_GEOMETRY = 5000  # images whose headers are read for the size/spacing histograms


def _fmt(values) -> str:
    return "×".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def image_geometry(record: dict, channels=None) -> tuple[tuple | None, tuple | None]:
    """(size, spacing) of a record's image from its header; (None, None) when unknown. A multi-channel
    case (``data.channels``) is described by its first channel (the grid every channel is resampled
    onto); a DICOM study folder by the series of its first channel."""
    ref = record["image"]
    if isinstance(ref, (list, tuple)):
        ref = ref[0] if ref else None
    if isinstance(ref, np.ndarray):
        return tuple(ref.shape), None
    text = str(ref)
    if NPZ_REF.match(text):
        return tuple(npz_entry(text).shape), None
    p = Path(text)
    if not p.exists():
        return None, None
    suffix = _suffix(p)
    if p.is_dir() or _is_dicom(p):
        from medmim.data.dicom import header_summary, series_files, study_series_files

        if p.is_dir() and channels and not record.get("series_id"):
            files = study_series_files(p, list(channels)[:1])[0]
        else:
            files = series_files(p, record.get("series_id") or None) if p.is_dir() else [p]
        h = header_summary(files[0])
        n_sl = int(record.get("n_slices") or 0) or (len(files) if len(files) > 1 else 0)
        size = (h["cols"], h["rows"], n_sl) if n_sl > 1 else (h["rows"], h["cols"])
        sp = h["spacing"]
        if sp is None:
            return size, None
        spacing = (sp[1], sp[0], h["slice_thickness"] or 0.0) if n_sl > 1 else (sp[0], sp[1])
        return size, tuple(round(float(v), 3) for v in spacing)
    if suffix in NIFTI:
        import nibabel as nib

        img = nib.load(str(p))
        return tuple(int(v) for v in img.shape), tuple(round(float(v), 3) for v in img.header.get_zooms()[:3])
    if suffix in RASTER:
        from PIL import Image

        with Image.open(p) as im:
            return (im.size[1], im.size[0]), None
    if suffix in SITK:
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        r.ReadImageInformation()
        return tuple(r.GetSize()), tuple(round(float(v), 3) for v in r.GetSpacing())
    return None, None


def _dicom_files(records: list[dict]) -> list[Path]:
    from medmim.data.manifest import image_refs

    files: set[Path] = set()
    for r in records:
        for ref in image_refs(r):  # every channel's file
            if not isinstance(ref, (str, Path)) or NPZ_REF.match(str(ref)):
                continue
            p = Path(ref)
            if p.is_dir():
                files.update(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            elif p.exists() and _is_dicom(p):
                files.add(p)
    return sorted(files)


def build_card(records: list[dict], *, name: str, source: str = "", licence: str = "", modality: str = "",
               description: str = "", label_names: dict | None = None, skipped: list[dict] | None = None,
               extra: dict | None = None, pool: dict | None = None, duplicates_dropped: int = 0,
               channels: list[dict] | None = None) -> dict[str, Any]:
    """The card as a dict (see module doc). ``channels``: the input channels (``data.channels``), each
    ``{"name", "preset", "series"}`` (preset None where unknown, e.g. a card from a manifest alone). ``pool``: what pretraining saw besides the labelled
    images (``DataBundle.pool_info``, medmim.data.pool), recorded as ``pretraining_pool``.
    ``duplicates_dropped``: images already dropped from these records as byte-identical to another
    split's image (``prepare_data``)."""
    if not records:
        raise DataError(f"{name}: no records to describe")
    from medmim.data.splits import cross_split_duplicates

    dup_groups = cross_split_duplicates(records)
    per_split: dict[str, Counter] = defaultdict(Counter)
    patients: dict[str, set] = defaultdict(set)
    for r in records:
        split = r.get("split") or "unsplit"
        lab = r.get("label")
        per_split[split][json.dumps(lab) if lab not in (None, "") else "unlabelled"] += 1
        patients[split].add(str(r.get("patient_id")))
    classes = sorted({c for counter in per_split.values() for c in counter})
    splits = [s for s in ("train", "val", "test", "unsplit") if s in per_split] + \
        sorted(set(per_split) - {"train", "val", "test", "unsplit"})
    modalities = Counter(str(r.get("modality") or modality or "unknown") for r in records)
    sizes, spacings = Counter(), Counter()
    step = max(1, len(records) // MAX_GEOMETRY)
    sampled = records[::step]
    unreadable = 0
    for r in sampled:
        try:
            size, sp = image_geometry(r, [_Channel(c) for c in channels] if channels else None)
        except Exception:  # noqa: BLE001 - the card describes, it does not validate
            size, sp = None, None
        if size is None:
            unreadable += 1
            continue
        sizes[_fmt(size)] += 1
        spacings[_fmt(sp) if sp else "n/a (no spacing in file)"] += 1
    dicom_files = _dicom_files(records)
    phi = None
    if dicom_files:
        from medmim.data.dicom import phi_scan

        phi = {"files_scanned": len(dicom_files), "tags_with_values": phi_scan(dicom_files),
               "note": "tag names and file counts only; values are never read into this card"}
    card = {
        "name": name, "description": description, "source": source, "licence": licence,
        "fingerprint": records_fingerprint([r for r in records if not isinstance(r.get("image"), np.ndarray)]
                                           or records),
        "n_images": len(records), "n_patients": len({str(r.get("patient_id")) for r in records}),
        "modality": dict(modalities),
        "channels": list(channels) if channels else None,  # None: one grayscale channel
        "splits": {s: {"images": sum(per_split[s].values()), "patients": len(patients[s]),
                       "classes": {c: per_split[s].get(c, 0) for c in classes}} for s in splits},
        "label_names": label_names or {},
        "size_histogram": dict(sizes.most_common()), "spacing_histogram": dict(spacings.most_common()),
        "geometry_sampled": {"read": len(sampled), "of": len(records), "unreadable": unreadable},
        "phi_scan": phi,
        "skipped": len(skipped or []),
        # content hash (file bytes; array bytes for npz entries): counts only, never file names
        "duplicates_across_splits": {"groups": len(dup_groups), "images": sum(len(g) for g in dup_groups),
                                     "dropped": int(duplicates_dropped)},
    }
    if pool:
        card["pretraining_pool"] = pool
    if extra:
        card.update(extra)
    return card


class _Channel:
    """A card's channel entry where a ChannelSpec is expected (name, series)."""

    def __init__(self, entry: dict):
        self.name, self.preset, self.series = entry["name"], entry.get("preset"), entry.get("series")


def _channels_text(channels) -> str:
    if not channels:
        return "1 (grayscale)"
    parts = [c["name"] + (f" ({c['preset']})" if c.get("preset") else "")
             + (f", series '{c['series']}'" if c.get("series") else "") for c in channels]
    return f"{len(channels)}: " + "; ".join(parts)


def pool_markdown(pool: dict) -> list[str]:
    """The card's section on the unlabelled pretraining pool (counts only, no identifiers)."""
    d = pool["dropped"]
    lines = ["## Pretraining pool (unlabelled; pretraining only)", "",
             f"Pretraining saw {pool['pretraining_images']} images: {pool['labelled_images']} labelled "
             f"(train+val) and {pool['images']} from the pool. Leakage guard (content hash against val and "
             f"test, patient ids where the source has them): dropped {d['val']} duplicate(s) of val, {d['test']} "
             f"of test, {d['id_val'] + d['id_test']} image(s) of val/test patients; "
             f"{d['in_pool']} repeated pool image(s).", "",
             "| source | kind | preset | found | used | dup. val | dup. test | val/test patient | patients |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in pool["sources"]:
        lines.append(f"| {s['name']} | {s['kind']} | {s['preset']} | {s['found']}"
                     + (f" (fraction {s['fraction']:g}: {s['sampled']})" if s.get("fraction", 1) < 1 else "")
                     + f" | {s['images']} | {s['dropped_val']} | {s['dropped_test']} | "
                     f"{s['dropped_id_val'] + s['dropped_id_test']} | {s['patients'] or '–'} |")
    return lines + [""]


def render_markdown(card: dict) -> str:
    lines = [f"# Data card: {card['name']}", ""]
    if card.get("description"):
        lines += [card["description"], ""]
    lines += ["| field | value |", "|---|---|",
              f"| source | {card.get('source') or '–'} |", f"| licence | {card.get('licence') or '–'} |",
              f"| modality | {', '.join(f'{k} ({v})' for k, v in card['modality'].items())} |",
              f"| channels | {_channels_text(card.get('channels'))} |",
              f"| images | {card['n_images']} |", f"| patients | {card['n_patients']} |",
              f"| fingerprint | `{card['fingerprint']}` |", f"| skipped at build | {card.get('skipped', 0)} |"]
    dup = card.get("duplicates_across_splits")
    if dup is not None:
        lines.append(f"| byte-identical images across splits | {dup['groups']} group(s), {dup['images']} image(s)"
                     + (f"; {dup['dropped']} dropped from the later split (data.duplicates)" if dup["dropped"] else "")
                     + " |")
    lines.append("")
    classes = sorted({c for s in card["splits"].values() for c in s["classes"]})
    names = card.get("label_names") or {}
    head = [f"{c} ({names[c]})" if c in names else c for c in classes]
    lines += ["## Splits and classes (images)", "", "| split | images | patients | " + " | ".join(head) + " |",
              "|---|---|---|" + "---|" * len(classes)]
    for s, v in card["splits"].items():
        lines.append(f"| {s} | {v['images']} | {v['patients']} | " + " | ".join(str(v["classes"][c]) for c in classes)
                     + " |")
    g = card["geometry_sampled"]
    lines += ["", f"## Image size (voxels) — {g['read']} of {g['of']} images read", "", "| size | images |",
              "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in list(card["size_histogram"].items())[:15]]
    lines += ["", "## Voxel spacing (mm)", "", "| spacing | images |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in list(card["spacing_histogram"].items())[:15]]
    lines += ["", "## PHI scan (DICOM headers)", ""]
    phi = card.get("phi_scan")
    if not phi:
        lines.append("No DICOM files in this data set (nothing to scan).")
    else:
        tags = phi["tags_with_values"]
        lines.append(f"{phi['files_scanned']} DICOM file(s) scanned. Tags holding a value "
                     "(names and counts only; values are never recorded):")
        lines.append("")
        if tags:
            lines += ["| tag | files |", "|---|---|"] + [f"| {k} | {v} |" for k, v in tags.items()]
        else:
            lines.append("none")
    if card.get("pretraining_pool"):
        lines += [""] + pool_markdown(card["pretraining_pool"])
    lines += ["", "_Generated by `medmim data card`._", ""]
    return "\n".join(lines)


def write_card(card: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``<out>.md`` and ``<out>.json`` atomically (``out`` without suffix or with .md/.json)."""
    out = Path(out)
    if out.suffix in (".md", ".json"):
        out = out.with_suffix("")
    md, js = out.with_name(out.name + ".md"), out.with_name(out.name + ".json")
    write_json(js, card)
    write_text(md, render_markdown(card))
    return md, js
