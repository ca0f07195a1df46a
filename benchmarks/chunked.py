"""Chunked exact EM: peak memory and seconds per iteration of a full-covariance Gaussian
mixture (D = 8, K = 16, float64), with and without ``EM(model, chunk_size=C)``.

    python benchmarks/chunked.py [--sizes 1e5,1e6] [--chunk 1e5] [--iters 3]

Each configuration runs in a fresh subprocess, which reports its own peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: data, compiled program and every buffer XLA
held) and the seconds per iteration of a second run (compile excluded), restarts = 1, tol = 0.
Prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from bayes_em import EM, models
n, chunk, iters = int(sys.argv[1]), (None if sys.argv[2] == "none" else int(sys.argv[2])), \
    int(sys.argv[3])
D, K = 8, 16
rng = np.random.default_rng(0)
centres = rng.normal(0.0, 4.0, (K, D))
x = centres[rng.integers(0, K, n)] + rng.normal(size=(n, D))
em = EM(models.gmm, max_iter=iters, tol=0.0, progress_bar=False, chunk_size=chunk)
t0 = time.perf_counter()
r = em.run(jax.random.PRNGKey(0), x, K)
first = time.perf_counter() - t0
t0 = time.perf_counter()
r = em.run(jax.random.PRNGKey(0), x, K)
second = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(n=n, chunk=chunk, s_per_iter=second / r.n_iter, first_run=first,
                      rss=rss, objective=r.objective, n_iter=r.n_iter)))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--chunk", default="1e5")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--chunked-only", action="store_true")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    chunk = int(float(args.chunk))
    rows = []
    for n in (int(float(s)) for s in args.sizes.split(",")):
        for c in ((chunk,) if args.chunked_only else (None, chunk)):
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(c or "none"),
                                  str(args.iters)], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                rows.append(dict(n=n, chunk=c, error=out.stderr.strip().splitlines()[-1]))
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    print("| N | chunk_size | peak RSS (GB) | s / iteration | first run (s, compile incl.) "
          "| log-likelihood |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c = r["chunk"] or "—"
        if "error" in r:
            print(f"| {r['n']:.0e} | {c} | failed: {r['error'][:60]} | | | |")
            continue
        print(f"| {r['n']:.0e} | {c} | {r['rss'] / 1e9:.2f} | {r['s_per_iter']:.2f} "
              f"| {r['first_run']:.1f} | {r['objective']:.6g} |")


if __name__ == "__main__":
    main()
