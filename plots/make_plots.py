"""Make the README's figure, ``plots/decomposition.png``, from the demo run (``make plots``).

Usage::

    python plots/make_plots.py [RUN]

RUN is the folder of the main job (default ``runs/demo``, what ``make demo`` writes). When
``RUN/fit/report/summary.csv`` does not exist the demo job is run into RUN first
(``galdecomp run --config runs/demo.yaml --out RUN --overwrite``, 2-3 minutes).

The figure pairs truth maps of the simulated sky (``RUN/sky/truth``, transformed and
standardised as the report compares them) with the latent feature the report's one-to-one
matching gives each (``RUN/fit/report/summary.csv``): the matched pairs with the highest KSG
mutual information, one row each, the feature's sign turned to agree with the truth map.
"""
import csv
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from galdecomp.catalog import load_catalog  # noqa: E402
from galdecomp.figures import mollview_grid  # noqa: E402
from galdecomp.preprocessing import Preprocessor  # noqa: E402
from galdecomp.products.report import read_run  # noqa: E402

#: Rows of the figure (truth maps with their matched features).
N_ROWS = 5


def ensure_demo(run):
    """Run the demo job into ``run`` unless its report exists; return the summary's path."""
    summary = os.path.join(run, "fit", "report", "summary.csv")
    if not os.path.isfile(summary):
        print(f"{summary} not found: running the demo job into {run}", flush=True)
        subprocess.run([sys.executable, "-m", "galdecomp", "run", "--config",
                        os.path.join(ROOT, "runs", "demo.yaml"), "--out", run, "--overwrite"],
                       check=True, env={**os.environ, "PYTHONPATH": ROOT})
    return summary


def matched_pairs(summary, n):
    """The ``n`` (template, feature, MI) of the galdecomp matching with the highest MI."""
    with open(summary) as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "galdecomp" and r["matched_feature"]]
    rows.sort(key=lambda r: -float(r["matched_mi_ksg"]))
    return [(r["template"], r["matched_feature"], float(r["matched_mi_ksg"])) for r in rows[:n]]


def decomposition_figure(run, path, n=N_ROWS):
    """Truth maps beside their matched features, ``n`` rows, written to ``path``."""
    pairs = matched_pairs(ensure_demo(run), n)
    fit = read_run(os.path.join(run, "fit"))
    truth = load_catalog(os.path.join(run, "sky", "truth", "catalog.yaml"), nside=fit["nside"])
    T = Preprocessor.fit(truth).forward(truth.values)
    maps, titles = [], []
    for template, feature, mi in pairs:
        t = T[truth.names.index(template)]
        x = fit["features"][fit["names"].index(feature)]
        ok = np.isfinite(t) & np.isfinite(x)
        r = float(np.corrcoef(t[ok], x[ok])[0, 1])
        sign = "" if r >= 0 else "\u2212"
        maps += [t, x if r >= 0 else -x]
        titles += [f"truth: {template}", f"{sign}{feature}  (r = {abs(r):.2f}, MI {mi:.2f} nats)"]
    mollview_grid(np.stack(maps), titles, path, ncols=2, panel_size=(3.4, 2.2), xsize=440,
                  suptitle="Demo sky: truth maps (left) and the matched latent features (right)")
    _palette(path)
    return path


def _palette(path):
    """Rewrite the PNG with a 128-colour palette (a third of the size; every panel uses viridis)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    run = os.path.abspath(argv[0] if argv else os.path.join(ROOT, "runs", "demo"))
    print(decomposition_figure(run, os.path.join(HERE, "decomposition.png")))


if __name__ == "__main__":
    main()
