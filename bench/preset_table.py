"""Every method on one preset's data and features, over seeds: image AUROC (and CFLOW's pixel metrics), mean ± std.

    python bench/preset_table.py --preset mtd_lite0 --data_root DATA/magnetic_tile --seeds 0,1,2
    python bench/preset_table.py --preset mtd_lite0 --data_root DATA/magnetic_tile --variants gaussian,knn --seeds 0

Every row runs ``main.run`` with the preset (data and features: size, scales, views) and the method's own
training defaults, so the rows share the views, the scales and the held-out split of each seed. ``--set
field=value`` adds a setting to every row (for example ``--set img_size=224``), for the cost and resolution
tables. The table goes to stdout and ``--out`` (markdown).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import PRESETS, make_config  # noqa: E402
from main import run  # noqa: E402
from utils import atomic_write_bytes  # noqa: E402

# short name (for --variants) → (row label, settings)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gaussian": ("Gaussian (Ledoit-Wolf)", {"method": "gaussian"}),
    "knn": ("kNN (k=2, cosine)", {"method": "knn"}),
    "none": ("SANF-AD without CAFF (--fusion none)", {"method": "sanf", "fusion": "none"}),
    "caff": ("SANF-AD with CAFF", {"method": "sanf"}),
    "cflow": ("CFLOW-AD (--scoring auto)", {"method": "cflow", "scoring": "auto"}),
    "sanf_cflow": ("SANF-AD + CFLOW-AD (--method sanf_cflow --scoring auto)", {"method": "sanf_cflow",
                                                                              "scoring": "auto"}),
}
METRICS = ("image_auroc", "pixel_auroc", "aupro")
HEAD_METRICS = ("sanf_image_auroc", "cflow_image_auroc")  # sanf_cflow's heads, in the same run


def parsed_settings(pairs: list[str]) -> dict[str, Any]:
    """``field=value`` pairs → values typed as the fields are (through ``make_config``'s checks later)."""
    from config import _TYPES  # the field types, for the conversion

    settings: dict[str, Any] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in _TYPES:
            raise SystemExit(f"--set {pair}: no field {name!r}")
        kind = _TYPES[name]
        settings[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return settings


def kept_epoch(task: dict[str, Any]) -> int | str | None:
    """A task's kept epoch; sanf_cflow's as ``sanf/cflow``; None for a method without epochs."""
    heads = task.get("heads", {})
    return "/".join(str(heads[head]["kept_epoch"]) for head in heads) if heads else task.get("kept_epoch")


def one_run(preset: str, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """The mean metrics, kept epoch and seconds of one seeded run."""
    with tempfile.TemporaryDirectory() as results:
        config = make_config(preset, **settings, seed=seed, results_dir=results)
        started = time.perf_counter()
        payload = run(config)
        tasks = list(payload["per_class"].values())
        row = {name: payload["mean"][name] for name in METRICS + HEAD_METRICS if name in payload["mean"]}
        row["kept_epoch"] = [kept_epoch(task) for task in tasks]
        row["fit_seconds"] = float(np.mean([task.get("fit_seconds", 0.0) for task in tasks]))
        row["seconds"] = time.perf_counter() - started
        return row


def _cell(values: list[float]) -> str:
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0  # sample std; 0 for one seed
    return f"{np.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/preset_table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=PRESETS, help="data and features of every row")
    parser.add_argument("--data_root", default="", help="dataset folder")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="rows among " + ", ".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a setting for every row (repeatable)")
    parser.add_argument("--cache_dir", default="cache", help="feature cache shared by all rows")
    parser.add_argument("--out", default="results/bench_preset_table.md", help="markdown table")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {', '.join(unknown)}; choose among {', '.join(VARIANTS)}")
    common = {"data_root": args.data_root, "cache_dir": args.cache_dir, **parsed_settings(args.set)}
    lines = ["| method | image AUROC | pixel AUROC | AUPRO@0.3 | SANF head | CFLOW head | kept epochs | fit s | run s |",
             "|---|---|---|---|---|---|---|---|---|"]
    seconds: dict[str, tuple[float, float]] = {}  # variant → mean (fit, run) seconds
    for key in args.variants.split(","):
        label, overrides = VARIANTS[key]
        runs = [one_run(args.preset, {**common, **overrides}, seed) for seed in seeds]
        seconds[key] = (float(np.mean([r["fit_seconds"] for r in runs])), float(np.mean([r["seconds"] for r in runs])))
        cells = [_cell([r[m] for r in runs]) if m in runs[0] else "-" for m in METRICS + HEAD_METRICS]
        kept = "; ".join(",".join(str(k) for k in r["kept_epoch"]) for r in runs) if runs[0]["kept_epoch"][0] \
            is not None else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {kept} | {seconds[key][0]:.1f} | {seconds[key][1]:.0f} |")
        print(lines[-1], flush=True)
    extra = ", ".join(args.set) or "no other setting"
    text = (f"`--preset {args.preset}` ({extra}), seeds {seeds}: mean ± sample std (n - 1) over seeds; kept "
            "epochs per seed (sanf_cflow: SANF head / CFLOW head); fit and run seconds are means per run.\n\n" + "\n".join(lines) + "\n")
    if {"sanf_cflow", "cflow", "caff"} <= set(seconds):
        alone = seconds["cflow"][1] + seconds["caff"][0]
        text += (f"\nOne backbone pass for both heads: the sanf_cflow run takes {seconds['sanf_cflow'][1]:.0f} s, "
                 f"{seconds['sanf_cflow'][1] / alone:.2f} x (the CFLOW-AD run + SANF-AD's fit = {alone:.0f} s).\n")
    atomic_write_bytes(Path(args.out), text.encode())
    print("\n" + text)


if __name__ == "__main__":
    from main import EXPECTED_ERRORS
    from utils import run_cli

    run_cli(main, EXPECTED_ERRORS)
