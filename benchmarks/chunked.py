"""Chunked exact EM: peak memory and seconds per iteration of a full-covariance Gaussian
mixture (D = 8, K = 16, float64), with and without ``EM(model, chunk_size=C)``.

    python benchmarks/chunked.py [--sizes 1e5,1e6] [--chunk 1e5] [--iters 3] [--sklearn 1e6]

Each configuration runs in a fresh subprocess, which reports its peak RSS from the moment its
data exist (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux): the data, the
compiled program and every buffer the fits held; the data's generation is left out.
Per iteration = (t(iters + 1 iterations) − t(1 iteration)) / iters on second runs
(compile excluded); the rest of a run (starts, checks, the final E-step) is its fixed cost.
restarts = 1, tol = 0. ``--sklearn``: scikit-learn's GaussianMixture at those sizes, measured
the same way. Prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from bayes_em import EM, models
n, chunk, iters = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
D, K = 8, 16
rng = np.random.default_rng(0)
centres = rng.normal(0.0, 4.0, (K, D))
x = centres[rng.integers(0, K, n)] + rng.normal(size=(n, D))
with open("/proc/self/clear_refs", "w") as f:  # the peak from here: the data's generation left out
    f.write("5")
if chunk == "sklearn":
    from sklearn.mixture import GaussianMixture
    loc = x[rng.choice(n, K, replace=False)]
    def fit(m):
        gm = GaussianMixture(K, covariance_type="full", max_iter=m, tol=0.0, means_init=loc,
                             init_params="random_from_data", random_state=0)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter(); gm.fit(x); return time.perf_counter() - t0, gm
    t1, _ = fit(1)
    t2, gm = fit(iters + 1)
    first, objective = t1, float(gm.score(x) * n)
    per_iter, fixed = (t2 - t1) / iters, t1 - (t2 - t1) / iters
else:
    chunk = None if chunk == "none" else int(chunk)
    def timed(m):
        em = EM(models.gmm, max_iter=m, tol=0.0, progress_bar=False, chunk_size=chunk)
        t0 = time.perf_counter(); em.run(jax.random.PRNGKey(0), x, K)
        first = time.perf_counter() - t0
        t0 = time.perf_counter(); r = em.run(jax.random.PRNGKey(0), x, K)
        return first, time.perf_counter() - t0, r
    first, t1, _ = timed(1)
    _, t2, r = timed(iters + 1)
    per_iter, fixed, objective = (t2 - t1) / iters, t1 - (t2 - t1) / iters, r.objective
rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
           if line.startswith("VmHWM"))
print(json.dumps(dict(n=n, chunk=sys.argv[2], s_per_iter=per_iter, fixed=fixed,
                      first_run=first, rss=rss, objective=objective)))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--chunk", default="1e5")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--chunked-only", action="store_true")
    ap.add_argument("--sklearn", default="", help="sizes at which to run scikit-learn too")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    chunk = int(float(args.chunk))
    rows = []
    sk = {int(float(s)) for s in args.sklearn.split(",") if s}
    for n in (int(float(s)) for s in args.sizes.split(",")):
        runs = (chunk,) if args.chunked_only else ("none", chunk)
        for c in runs + (("sklearn",) if n in sk else ()):
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(c),
                                  str(args.iters)], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                rows.append(dict(n=n, chunk=c, error=out.stderr.strip().splitlines()[-1]))
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    print("| N | fit | peak RSS (GB) | s / iteration | fixed cost per run (s) "
          "| first run (s, compile incl.) | log-likelihood |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = {"none": "unchunked", "sklearn": "scikit-learn"}.get(str(r["chunk"]),
                                                                 f"chunk_size={r['chunk']}")
        if "error" in r:
            print(f"| {r['n']:.0e} | {c} | failed: {r['error'][:60]} | | | | |")
            continue
        print(f"| {r['n']:.0e} | {c} | {r['rss'] / 1e9:.2f} | {r['s_per_iter']:.3f} "
              f"| {r['fixed']:.2f} | {r['first_run']:.1f} | {r['objective']:.8g} |")


if __name__ == "__main__":
    main()
