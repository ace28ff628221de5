"""A static HTML report of a study folder: one folder, opens offline, no scripts or styles fetched.

    write_report("runs/demo")  ->  runs/demo/report/index.html  (+ report/img/*.png)

It reads only what the study wrote (summary.json, results.json, label_efficiency.png,
pretrain-*/recon/*.png, pretrain-*/metrics.jsonl, data_card.json, config.yaml, environment.json),
so it can be re-rendered at any time. Images are copied next to the page. Patient identifiers
never appear: the data card holds counts only, and keys that name identifying fields are dropped
from everything shown.

When every ``<img>`` has loaded, a small inline script sets ``<body data-images="ok:N">`` (or
``broken:K``), which a headless browser can check.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medmim.io import write_text

PHI_KEYS = ("patient", "patientname", "patientid", "patient_id", "birth", "accession", "institution",
            "referringphysician", "otherpatient", "study_id", "studyinstanceuid", "seriesinstanceuid")


def _scrub(obj: Any) -> Any:
    """Drop keys that name patient-identifying fields, at any depth (counts stay)."""
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items()
                if not any(p in str(k).lower().replace(" ", "") for p in PHI_KEYS) or str(k) == "n_patients"
                or str(k) == "patients"}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, nd: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{nd}f}"
    return _e(v)


def _table(headers: list[str], rows: list[list[str]], table_id: str | None = None) -> str:
    tid = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _is_scratch(init: str) -> bool:
    return init.startswith("scratch") or init.startswith("none")


def comparison(summary: list[dict], metric: str) -> list[dict]:
    """Per mode × fraction: the best scratch mean, the best pretrained mean, and their difference."""
    out = []
    for mode in sorted({s["mode"] for s in summary}):
        for frac in sorted({s["fraction"] for s in summary if s["mode"] == mode}):
            grp = [s for s in summary if s["mode"] == mode and s["fraction"] == frac
                   and isinstance(s.get(f"{metric}_mean"), (int, float)) and s[f"{metric}_mean"] is not None
                   and math.isfinite(s[f"{metric}_mean"])]
            scratch = [s for s in grp if _is_scratch(s["init"])]
            pre = [s for s in grp if not _is_scratch(s["init"])]
            if not scratch or not pre:
                continue
            sb = max(scratch, key=lambda s: s[f"{metric}_mean"])
            pb = max(pre, key=lambda s: s[f"{metric}_mean"])
            out.append({"mode": mode, "fraction": frac, "scratch": sb[f"{metric}_mean"], "scratch_init": sb["init"],
                        "best_pretrained": pb[f"{metric}_mean"], "best_init": pb["init"],
                        "delta": pb[f"{metric}_mean"] - sb[f"{metric}_mean"]})
    return out


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.failed td{color:#a00}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em;max-height:40em}
img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
.muted{color:#666;font-size:.9em}.pos{color:#070}.neg{color:#a00}
"""

JS = """
(function(){
  function check(){
    var imgs=document.images, ok=0, bad=0;
    for(var i=0;i<imgs.length;i++){ if(!imgs[i].complete) return false; if(imgs[i].naturalWidth>0) ok++; else bad++; }
    document.body.setAttribute('data-images', bad ? 'broken:'+bad : 'ok:'+ok);
    return true;
  }
  window.addEventListener('load', function(){ if(!check()){ var t=setInterval(function(){ if(check()) clearInterval(t); },50); } });
})();
"""


def _copy_images(study: Path, img_dir: Path) -> tuple[str | None, list[tuple[str, str, str]]]:
    """Copy the curve and the reconstruction grids; return (curve name, [(pretrain, caption, file)])."""
    img_dir.mkdir(parents=True, exist_ok=True)
    curve = None
    if (study / "label_efficiency.png").exists():
        shutil.copyfile(study / "label_efficiency.png", img_dir / "label_efficiency.png")
        curve = "img/label_efficiency.png"
    grids = []
    for pre in sorted(study.glob("pretrain-*")):
        pngs = sorted((pre / "recon").glob("*.png"))
        if not pngs:
            continue
        picks = [pngs[0], pngs[-1]] if len(pngs) > 1 else pngs
        for p in picks:
            name = f"{pre.name}-{p.name}"
            shutil.copyfile(p, img_dir / name)
            grids.append((pre.name.removeprefix("pretrain-"), p.stem, f"img/{name}"))
    return curve, grids


def _pretrain_rows(study: Path) -> list[list[str]]:
    rows = []
    for pre in sorted(study.glob("pretrain-*")):
        meta = _read_json(pre / "encoder.json", {}) or {}
        metrics = []
        if (pre / "metrics.jsonl").exists():
            for line in (pre / "metrics.jsonl").read_text().splitlines():
                try:
                    metrics.append(json.loads(line))
                except ValueError:
                    continue
        secs = sum(m.get("epoch_time_s", 0) or 0 for m in metrics)
        status = "failed" if (pre / "error.txt").exists() and not (pre / "done.json").exists() else \
            ("done" if (pre / "done.json").exists() else "incomplete")
        rows.append([_e(pre.name.removeprefix("pretrain-")), _e(meta.get("pretext", "")),
                     _e(meta.get("architecture", "")), _num(len(metrics)),
                     _num(metrics[0]["train_loss"]) if metrics else "–",
                     _num(metrics[-1]["train_loss"]) if metrics else "–", f"{secs:.0f}", _e(status)])
    return rows


def _data_card_html(card: dict | None) -> str:
    if not card:
        return "<p class='muted'>no data card recorded</p>"
    card = _scrub(card)
    facts = [(k, card.get(k)) for k in ("name", "source", "licence", "modality", "preset", "n_images",
                                        "n_patients", "fingerprint", "skipped") if card.get(k) not in (None, "", {})]
    out = _table(["field", "value"], [[_e(k), _e(json.dumps(v) if isinstance(v, dict) else v)] for k, v in facts])
    splits = card.get("splits") or {}
    classes = sorted({c for s in splits.values() for c in (s.get("classes") or {})})
    names = card.get("label_names") or {}
    head = ["split", "images", "patients"] + [f"class {c}" + (f" ({names[c]})" if c in names else "") for c in classes]
    rows = [[_e(s), _num(v.get("images")), _num(v.get("patients")), *[_num((v.get("classes") or {}).get(c, 0))
                                                                        for c in classes]]
            for s, v in splits.items()]
    out += _table(head, rows, "data-card")
    sizes = card.get("size_histogram")
    if sizes:
        out += "<p class='muted'>image sizes: " + ", ".join(f"{_e(k)} ({_e(v)})" for k, v in list(sizes.items())[:8]) \
            + "</p>"
    return out


def render_html(study: Path, curve: str | None, grids: list[tuple[str, str, str]]) -> str:
    summary_doc = _read_json(study / "summary.json", {}) or {}
    metric = summary_doc.get("metric", "auroc")
    summary = summary_doc.get("groups", [])
    rows = _read_json(study / "results.json", []) or []
    env = _scrub(_read_json(study / "environment.json", {}) or {})
    card = _read_json(study / "data_card.json")
    config = (study / "config.yaml").read_text() if (study / "config.yaml").exists() else ""
    n_ok = sum(r.get("status") == "ok" for r in rows)
    n_fail = len(rows) - n_ok

    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>medmim study: {_e(study.name)}</title>",
             f"<style>{CSS}</style></head><body data-images='pending'>",
             f"<h1>Label-efficiency study <code>{_e(study.name)}</code></h1>",
             f"<p class='muted'>metric: test {_e(metric)} · cells finished: {n_ok}"
             + (f" · <span class='neg'>failed: {n_fail}</span>" if n_fail else "")
             + f" · report written {_e(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}</p>"]

    parts.append("<h2>Results</h2>")
    srows = []
    for s in summary:
        m = s.get(f"{metric}_mean")
        srows.append([_e(s["init"]), _e(s["mode"]), _num(s["fraction"], 3).rstrip("0").rstrip("."),
                      _num(s.get("n_labelled")), _num(m), _num(s.get(f"{metric}_std")),
                      f"{_num(s.get('ci95_low'))} – {_num(s.get('ci95_high'))}", _num(s.get("n_seeds")),
                      _num(s.get("failed"))])
    parts.append(_table(["init", "mode", "fraction", "labelled images", f"{metric} mean", "std", "95% CI",
                         "seeds", "failed"], srows, "summary"))
    comp = comparison(summary, metric)
    if comp:
        crow = [[_e(c["mode"]), _num(c["fraction"], 3).rstrip("0").rstrip("."), f"{_num(c['scratch'])} ({_e(c['scratch_init'])})",
                 f"{_num(c['best_pretrained'])} ({_e(c['best_init'])})",
                 f"<span class='{'pos' if c['delta'] >= 0 else 'neg'}'>{c['delta']:+.3f}</span>"] for c in comp]
        parts.append("<h3>Best pretrained initialisation vs scratch</h3>")
        parts.append(_table(["mode", "fraction", "scratch", "best pretrained", "Δ"], crow, "comparison"))
    if curve:
        parts.append(f"<figure><img src='{_e(curve)}' alt='label-efficiency curve'><figcaption>Test {_e(metric)} "
                     "against the number of labelled images (log scale); band: 95% CI over seeds.</figcaption></figure>")

    parts.append("<h2>Cells</h2>")
    fields = [k for k in ("cell", "init", "mode", "fraction", "seed", "n_labelled", "best_epoch", "val_auroc",
                          f"test_{metric}", "test_accuracy", "status", "error")
              if any(k in r for r in rows)]
    crow_html = []
    for r in rows:
        cls = "" if r.get("status") == "ok" else " class='failed'"
        crow_html.append(f"<tr{cls}>" + "".join(f"<td>{_num(r.get(k))}</td>" for k in fields) + "</tr>")
    parts.append("<table id='cells'><thead><tr>" + "".join(f"<th>{_e(f)}</th>" for f in fields) + "</tr></thead><tbody>"
                 + "".join(crow_html) + "</tbody></table>")

    parts.append("<h2>Pretraining</h2>")
    prow = _pretrain_rows(study)
    parts.append(_table(["init", "pretext", "encoder", "epochs", "first loss", "last loss", "seconds", "status"], prow)
                 if prow else "<p class='muted'>no pretraining in this study</p>")
    for init, caption, src in grids:
        parts.append(f"<figure><img src='{_e(src)}' alt='reconstructions {_e(init)} {_e(caption)}'>"
                     f"<figcaption>{_e(init)}, {_e(caption)}: input / masked input / reconstruction</figcaption></figure>")

    parts.append("<h2>Data</h2>")
    parts.append(_data_card_html(card))

    parts.append("<h2>Configuration</h2>")
    parts.append(f"<pre id='config'>{_e(config)}</pre>")
    parts.append("<h2>Environment</h2>")
    parts.append(f"<pre id='environment'>{_e(json.dumps(env, indent=2, sort_keys=True, default=str))}</pre>")
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts)


def write_report(study_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render ``<study_dir>/report/index.html`` (+ img/); the folder is replaced as a whole."""
    study = Path(study_dir)
    out = Path(out_dir) if out_dir else study / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report.", dir=out.parent))
    try:
        curve, grids = _copy_images(study, tmp / "img")
        write_text(tmp / "index.html", render_html(study, curve, grids))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"
