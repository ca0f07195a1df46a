"""Online (stepwise) EM on rows streamed from a memory-mapped ``.npy`` file against batch EM:
peak memory, seconds and held-out log-likelihood per row of a full-covariance Gaussian mixture
(float64).

    python benchmarks/online.py [--sizes 1e6,1e7] [--batch 1e4] [--batch-em 1e6] [--dim 4] [--k 8]

The data (K well-separated Gaussians in D dimensions) are written block by block into a
temporary ``.npy`` file, with 1e5 held-out rows from the same mixture. Each configuration runs
in a fresh subprocess that reports its own peak RSS (``resource.getrusage``): online EM reads
the file one batch at a time, through ``np.load(mmap_mode="r")`` ("online": the pages read
stay mapped and count in the RSS) or by plain reads ("online-read") (one pass, default step sizes
ρ_t = (t + 2)^-0.6, ``n_total`` = the file's rows); batch EM loads its rows into memory and
runs to ``tol=1e-8``. Both start from the same locations (the true centres moved by 0.5 per
coordinate). Prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import json, resource, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from bayes_em import EM, OnlineEM, models
mode, path, held_path, n, batch, K = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
init = dict(loc=np.load(path.replace(".npy", "_init.npy")))
held = np.load(held_path)
t0 = time.perf_counter()
if mode.startswith("online"):
    if mode == "online":  # memory-mapped: the pages read stay resident (counted in RSS)
        stream = np.load(path, mmap_mode="r")[:n]
        batches = (np.asarray(stream[i:i + batch]) for i in range(0, n, batch))
    else:  # plain reads of one batch at a time: memory independent of the file's size
        def read():
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, _, dtype = header(f)
                for i in range(0, n, batch):
                    yield np.fromfile(f, dtype, min(batch, n - i) * shape[1]).reshape(-1, shape[1])
        batches = read()
    online = OnlineEM(models.gmm, init_values=init)
    state = online.run(jax.random.PRNGKey(0), batches, n_total=n, progress_bar=False, K=K)
    seconds = time.perf_counter() - t0
    params = online.params(state)
    loglik = online.log_likelihood(state, held, K=K)
    iters = int(state.t)
else:
    x = np.array(np.load(path, mmap_mode="r")[:n])
    em = EM(models.gmm, init_values=init, max_iter=500, tol=1e-8, progress_bar=False)
    r = em.run(jax.random.PRNGKey(0), x, K)
    seconds = time.perf_counter() - t0
    params = r.params
    loglik = em.e_step(r.params, held, K).log_likelihood / len(held)
    iters = r.n_iter
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(mode=mode, n=n, seconds=seconds, rss=rss, loglik=loglik, iters=iters,
                      loc=np.asarray(params["loc"]).tolist())))
"""


def write_data(path, held_path, n, D, K, seed=0, block=1_000_000):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, (K, D))
    np.save(path.replace(".npy", "_init.npy"), centres + 0.5)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, D))
    for i in range(0, n, block):
        m = min(block, n - i)
        out[i:i + m] = centres[rng.integers(0, K, m)] + rng.normal(size=(m, D))
    out.flush()
    del out
    np.save(held_path, centres[rng.integers(0, K, 100_000)] + rng.normal(size=(100_000, D)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e6,1e7")
    ap.add_argument("--batch", default="1e4")
    ap.add_argument("--batch-em", default="1e6", help="rows of the batch EM reference")
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    batch, n_batch = int(float(args.batch)), int(float(args.batch_em))
    runs = [("batch", n_batch)] + [(m, n) for n in sizes for m in ("online", "online-read")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, held = os.path.join(tmp, "x.npy"), os.path.join(tmp, "held.npy")
        write_data(path, held, max(sizes + [n_batch]), args.dim, args.k)
        for mode, n in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, mode, path, held, str(n),
                                  str(batch), str(args.k)], capture_output=True, text=True,
                                 env=env)
            if out.returncode != 0:
                rows.append(dict(mode=mode, n=n, error=out.stderr.strip().splitlines()[-1]))
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    ref = next((r for r in rows if r["mode"] == "batch" and "error" not in r), None)
    print(f"\nD = {args.dim}, K = {args.k}, full covariance, float64; online batches of {batch} "
          "rows, one pass\n")
    print("| method | rows | updates / iterations | seconds | peak RSS MiB | held-out loglik / row "
          "| Δ vs batch EM | max abs Δ loc vs batch EM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['n']:.0e} | error: {r['error']} | | | | | |")
            continue
        d = r["loglik"] - ref["loglik"] if ref else float("nan")
        dl = (float(np.max(np.abs(np.array(r["loc"]) - np.array(ref["loc"])))) if ref
              else float("nan"))
        print(f"| {r['mode']} | {r['n']:.0e} | {r['iters']} | {r['seconds']:.1f} | "
              f"{r['rss'] / 2**20:.0f} | {r['loglik']:.5f} | {d:+.2e} | {dl:.2e} |")


if __name__ == "__main__":
    main()
