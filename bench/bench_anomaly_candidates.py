"""Candidate anomaly detectors on the validation and test splits of a trained anomaly run.

Every candidate is scored on val (where the choice is made) and on test (reported, never used to
choose). The rows are the issue-17 directions:

* ``baseline``: the sanity baselines every evaluation reports (image statistics, both signs; the
  untrained model is the ``untrained`` row of each family below);
* ``atlas``: the normal-texture atlas (medmim/anomaly/texture.py) over a grid of detail bands, region
  sizes, statistics (mean / std, median / MAD) and image scores (mean of all regions, worst quarter);
* ``texmim``: masked texture modelling (medmim/anomaly/texmim.py): a small network trained on the
  normal images to predict hidden regions' detail energy from the blurred, masked image; the score
  is the one-sided shortfall of the actual energy, over a grid of input blur, mask ratio,
  statistics and image scores;
* ``mae``: the run's MAE (and the same MAE untrained), 1 - SSIM under covering masks, as
  ``medmim anomaly score`` computes it;
* ``atlas+mae``: the chosen atlas plus the MAE score, each standardised on the normal training images,
  with the MAE's weight w;
* ``knn``: PatchCore-style memory matching on patch tokens of the encoder (trained / untrained) and
  on raw pixel patches: each test token's distance to its nearest normal training tokens (anywhere,
  or at the same grid position), image score = mean or max over tokens;
* ``mim-residual``: a position-conditioned MIM score, the atlas recipe applied to the MAE's residual
  ``x - recon``: per-region log energy z-scored against the normal training images, one-sided.

    python bench/bench_anomaly_candidates.py --run-dir /work/anomaly_runs/pn60 --out bench/results/anomaly_candidates

Writes ``<out>.md`` (one table, best val first) and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medmim.anomaly import pipeline as P
from medmim.anomaly.baselines import statistic_scores
from medmim.anomaly.scoring import ScoreSettings, score_items
from medmim.anomaly.texmim import TextureMIM
from medmim.anomaly.texture import TextureAtlas, centre_and_scale
from medmim.config import load_config
from medmim.data.dataset import prepare_data
from medmim.eval.metrics import binary_auroc

BANDS = [(1.0,), (0.5, 1.0), (1.0, 2.0), (0.5, 1.0, 2.0), (1.0, 2.0, 4.0), (0.5, 1.0, 2.0, 4.0)]
POOLS = (1, 2, 4, 7)
STATS = ("mean_std", "median_mad")
TOPS = (1.0, 0.25)


def images(items: list[dict]) -> torch.Tensor:
    return torch.stack([it["image"] for it in items]).float()


@torch.no_grad()
def token_layers(encoder, x: torch.Tensor, layers: tuple[int, ...], bs: int = 256) -> dict[int, torch.Tensor]:
    """Patch tokens ``(N, T, D)`` of a ViT after block ``l`` (``l = depth``: the final norm's output)."""
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for i in range(0, len(x), bs):
        t = encoder.embed(x[i:i + bs])
        for j, blk in enumerate(encoder.blocks):
            t = blk(t)
            if j + 1 in out and j + 1 < len(encoder.blocks):
                out[j + 1].append(t)
        if len(encoder.blocks) in out:
            out[len(encoder.blocks)].append(encoder.norm(t))
    return {l: torch.cat(v) for l, v in out.items()}


def pixel_tokens(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)


def nearest(q: torch.Tensor, bank: torch.Tensor, k: int, bs: int = 2048) -> torch.Tensor:
    """``(Nq, D)`` queries -> mean Euclidean distance to their ``k`` nearest rows of ``bank``."""
    bn = bank.pow(2).sum(1)
    out = []
    for i in range(0, len(q), bs):
        qq = q[i:i + bs]
        d = (qq.pow(2).sum(1, keepdim=True) - 2 * qq @ bank.T + bn[None]).clamp_min(0)
        out.append(d.topk(k, dim=1, largest=False).values.sqrt().mean(1))
    return torch.cat(out)


def knn_scores(train: torch.Tensor, split: torch.Tensor) -> dict[str, np.ndarray]:
    """``(N, T, D)`` tokens -> image scores: global kNN-1 (mean / max over tokens), same-position kNN-3."""
    n, t, d = split.shape
    glob = nearest(split.reshape(-1, d), train.reshape(-1, d), 1).reshape(n, t)
    pos = torch.stack([nearest(split[:, j], train[:, j], 3) for j in range(t)], 1)
    return {"global kNN-1, mean": glob.mean(1).numpy(), "global kNN-1, max": glob.amax(1).numpy(),
            "same-position kNN-3, mean": pos.mean(1).numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="a `medmim anomaly train` run (MAE, ViT)")
    ap.add_argument("--out", required=True, help="output path without suffix (.md and .json are written)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["knn", "mae", "residual", "texmim"])
    args = ap.parse_args()
    run = Path(args.run_dir)
    cfg = load_config(run / "config.yaml", [])
    torch.set_num_threads(cfg.run.num_threads)
    data = prepare_data(cfg)
    train, _ = P.load_split(cfg, data, "train", normal_only=True)
    splits = {s: P.load_split(cfg, data, s) for s in ("val", "test")}
    y = {s: np.array([m["anomalous"] for m in meta], bool) for s, (_, meta) in splits.items()}
    items = {"train": train, **{s: it for s, (it, _) in splits.items()}}
    x = {k: images(v) for k, v in items.items()}
    rows: list[dict] = []
    t0 = time.time()

    def add(family: str, name: str, scores: dict[str, np.ndarray]) -> None:
        row = {"family": family, "name": name, **{s: round(float(binary_auroc(y[s], np.asarray(scores[s]))), 4)
                                                  for s in ("val", "test")}}
        rows.append(row)
        print(f"{family:13s} {name:58s} val {row['val']:.4f} test {row['test']:.4f}  ({time.time() - t0:.0f} s)",
              flush=True)

    # ---- the sanity baselines (no learning) ----------------------------------------------------------
    stats_ = {s: statistic_scores(items[s]) for s in ("val", "test")}
    for name in stats_["val"]:
        add("baseline", f"image statistic {name}", {s: stats_[s][name] for s in stats_})

    # ---- the texture atlas over its grid ----------------------------------------------------------
    atlas_scores: dict[tuple, dict[str, np.ndarray]] = {}
    for sigmas, pool, stats in itertools.product(BANDS, POOLS, STATS):
        atlas = TextureAtlas(sigmas, pool, "deficit", stats).fit(train)
        for top in TOPS:
            atlas.top = top
            sc = {s: atlas.score_items(items[s], keep_maps=False)["texture_score"].numpy() for s in items}
            atlas_scores[(sigmas, pool, stats, top)] = sc
            add("atlas", f"bands {list(sigmas)}, {pool}-px regions, {stats}, top {top}", sc)
    best_atlas = max((r for r in rows if r["family"] == "atlas"), key=lambda r: r["val"])
    chosen = next(k for k in atlas_scores if f"bands {list(k[0])}, {k[1]}-px regions, {k[2]}, top {k[3]}"
                  == best_atlas["name"])
    print(f"atlas chosen on val: {best_atlas['name']}", flush=True)

    # ---- masked texture modelling -------------------------------------------------------------------
    if "texmim" not in args.skip:
        for input_sigma, ratio, stats in itertools.product((1.0, 2.0, 3.0), (0.25, 0.5, 0.75), STATS):
            model = TextureMIM(input_sigma=input_sigma, mask_ratio=ratio, stats=stats, seed=cfg.run.seed).fit(train)
            for top in TOPS:
                model.top = top
                add("texmim", f"input blur {input_sigma}, mask ratio {ratio}, {stats}, top {top}",
                    {s: model.score_items(items[s], keep_maps=False)["texmim_score"].numpy() for s in ("val", "test")})

    # ---- the MAE (trained and untrained), alone and with the chosen atlas --------------------------
    models = {"trained": P.load_model(cfg, run), "untrained": P.untrained_model(cfg)}
    if "mae" not in args.skip:
        st = ScoreSettings.from_config(cfg)
        for mname, model in models.items():
            ss = {s: score_items(model, items[s], st, batch_size=cfg.anomaly.batch_size, errors=("ssim",),
                                 keep_maps=False)["ssim_score"].numpy() for s in items}
            add("mae", f"{mname} MAE, 1 - SSIM (K {st.num_masks}, ratio {st.mask_ratio})", ss)
            if mname == "trained":
                a = atlas_scores[chosen]

                def z(v: dict, s: str) -> np.ndarray:
                    return (v[s] - v["train"].mean()) / v["train"].std()

                for w in (0.1, 0.2, 0.3, 0.5):
                    add("atlas+mae", f"chosen atlas + MAE 1 - SSIM, z-sum, w_mae {w}",
                        {s: (1 - w) * z(a, s) + w * z(ss, s) for s in ("val", "test")})

    # ---- memory matching (PatchCore-style kNN) on tokens and pixels --------------------------------
    if "knn" not in args.skip:
        p = cfg.encoder.patch_size
        tok = {k: pixel_tokens(v, p) for k, v in x.items()}
        res = {s: knn_scores(tok["train"], tok[s]) for s in ("val", "test")}
        for name in res["val"]:
            add("knn", f"raw {p}x{p} pixel patches, {name}", {s: res[s][name] for s in res})
        depth = len(models["trained"].encoder.blocks)
        for mname, model in models.items():
            feats = {k: token_layers(model.encoder, v, (depth // 2, depth)) for k, v in x.items()}
            for layer in (depth // 2, depth):
                res = {s: knn_scores(feats["train"][layer], feats[s][layer]) for s in ("val", "test")}
                for name in res["val"]:
                    add("knn", f"{mname} encoder, block {layer}{' (normed)' if layer == depth else ''}, {name}",
                        {s: res[s][name] for s in res})

    # ---- a position-conditioned MIM score: the atlas recipe on the MAE's residual -----------------
    if "residual" not in args.skip:
        for mname, model in models.items():
            for ratio in (0.5, 0.25):
                st = replace(ScoreSettings.from_config(cfg), mask_ratio=ratio, smooth_sigma=0.0)
                rc = {s: score_items(model, items[s], st, batch_size=cfg.anomaly.batch_size, errors=("l2",),
                                     keep_maps=True)["recon"] for s in items}
                for pool in (2, 4):
                    e = {s: torch.log(F.adaptive_avg_pool2d((x[s] - rc[s]).pow(2).mean(1, keepdim=True),
                                                            x[s].shape[-1] // pool) + 1e-6) for s in items}
                    c, sd = centre_and_scale(e["train"].double(), "mean_std")
                    for side, sign in (("deficit", -1), ("excess", 1)):
                        add("mim-residual", f"{mname} MAE, ratio {ratio}, {pool}-px regions, {side}",
                            {s: F.relu(sign * (e[s] - c.float()) / sd.float().clamp_min(1e-6)).pow(2)
                             .flatten(1).mean(1).numpy() for s in ("val", "test")})

    # ---- write -------------------------------------------------------------------------------------
    rows.sort(key=lambda r: -r["val"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"run_dir": str(run), "n": {s: {"normal": int((~y[s]).sum()), "anomalous": int(y[s].sum())} for s in y},
            "n_train_normal": len(train), "atlas_chosen_on_val": best_atlas["name"], "seconds": round(time.time() - t0)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Candidates on `{run}` (val: where choices are made; test: reported only). "
             f"Atlas chosen on val: {best_atlas['name']}.", "", "| family | candidate | val AUROC | test AUROC |",
             "|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['name']} | {r['val']:.4f} | {r['test']:.4f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
