"""The label-efficiency study from Python (notebooks): one call, a pandas DataFrame back.

    import medmim.study
    df = medmim.study.run("demo", **{"pretrain.epochs": 2})      # a bundled config, dotted overrides
    df = medmim.study.run("my.yaml", pretrain__epochs=2)          # or keyword style: __ for the dots
    medmim.study.summary(df)                                      # mean ± std, 95% CI per group

The study is resumable exactly as ``medmim study``: calling ``run`` again with the same
``run.name`` reuses every finished cell. The run folder (results, curve, ``report/index.html``)
is ``<run.out_dir>/<run.name>``; ``df.attrs["run_dir"]`` holds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medmim.config import Config, load_config, with_overrides
from medmim.errors import ConfigError

__all__ = ["run", "load", "summary", "config"]


def _override_list(overrides: dict[str, Any]) -> list[str]:
    """``{"pretrain.epochs": 2, "study__seeds": [0, 1]}`` -> ``["pretrain.epochs=2", "study.seeds=[0, 1]"]``."""
    return [f"{key.replace('__', '.')}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in overrides.items()]


def config(config_or_path: Config | dict | str | Path | None = None, **overrides: Any) -> Config:
    """The resolved study config: a Config, a dict of sections, a YAML path or a bundled config name."""
    extra = _override_list(overrides)
    if isinstance(config_or_path, Config):
        return with_overrides(config_or_path, extra) if extra else config_or_path
    if isinstance(config_or_path, dict):
        try:
            cfg = Config.model_validate(config_or_path)
        except Exception as exc:  # pydantic ValidationError: one readable line
            raise ConfigError(f"config dict: {str(exc).splitlines()[0]} ({str(exc).splitlines()[1:2]})") from None
        return with_overrides(cfg, extra) if extra else cfg
    return load_config(config_or_path, extra)


def run(config_or_path: Config | dict | str | Path | None = "demo", *, resume: bool = True, progress: bool = False,
        verbose: bool = True, **overrides: Any):
    """Run (or resume) a study; return one row per cell as a DataFrame.

    Columns: cell, init, mode, fraction, seed, status, n_labelled, test_<metric>..., error.
    """
    import pandas as pd

    from pipelines.label_efficiency import run_study

    cfg = config(config_or_path, **overrides)
    rows = run_study(cfg, resume=resume, progress=progress, log=print if verbose else (lambda m: None))
    df = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows])
    df.attrs["run_dir"] = str(Path(cfg.run.out_dir) / cfg.run.name)
    df.attrs["metric"] = cfg.study.metric
    return df


def load(run_dir: str | Path):
    """The per-cell results of a study folder (results.json) as a DataFrame."""
    import pandas as pd

    from pipelines.label_efficiency import load_results

    df = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in load_results(run_dir)])
    df.attrs["run_dir"] = str(run_dir)
    return df


def summary(df, metric: str | None = None):
    """Mean ± std and the 95% CI of ``test_<metric>`` per init × mode × fraction (over seeds and
    cross-validation folds), with each pretrained init's paired difference to scratch and its
    Wilcoxon signed-rank p-value over matched (fold, seed) cells, as a DataFrame."""
    import pandas as pd

    from pipelines.label_efficiency import summarize_study

    metric = metric or df.attrs.get("metric", "auroc")
    return pd.DataFrame(summarize_study(df.to_dict("records"), metric))
