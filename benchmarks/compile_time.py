"""Compile time of a Gaussian-mixture fit in a fresh process: each row runs in its own Python
process, so nothing compiled by an earlier row (or by a peer) is reused.

    python benchmarks/compile_time.py [--sizes 1e4,1e6] [--cov full,diag] [--f32] [--bar]

"compile" = first run − best warm run, both after imports and data creation (includes site
discovery, the checks, the closed-form detection and the fit's own compilation); "XLA" = the
seconds XLA spends compiling in the first run (JAX's ``backend_compile_duration`` events), with
the number of programs compiled. D = 8, K = 16, 5 iterations, the models of ``gmm.py``.
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
sys.argv = ["gmm.py"] + (["--f32"] if cfg["f32"] else [])
sys.path.insert(0, cfg["dir"])
import gmm  # the benchmark's models; it sets float32 / float64 and the threads from its arguments
import jax, jax.numpy as jnp, numpy as np
from bayes_em import EM

xla = []
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **_: xla.append(d) if e == "/jax/core/compile/backend_compile_duration" else None)

N, D, K = cfg["n"], 8, 16
dtype = jnp.float32 if cfg["f32"] else jnp.float64
rng = np.random.default_rng(0)
centers = 3 * rng.normal(size=(K, D))
x = jnp.asarray(centers[rng.integers(K, size=N)] + rng.normal(size=(N, D)), dtype)
init = dict(w=jnp.ones(K, dtype) / K, loc=jnp.asarray(centers + rng.normal(size=(K, D)), dtype))
if cfg["cov"] == "full":
    model, init["cov"] = gmm.gmm_full, jnp.broadcast_to(2 * jnp.eye(D, dtype=dtype), (K, D, D))
else:
    model, init["scale"] = gmm.gmm_diag, jnp.full((K, D), 1.4, dtype)
x.block_until_ready()
xla.clear()  # count the fit's compilations only, not the data's
em = EM(model, max_iter=5, tol=0.0, init_values=init, progress_bar=cfg["bar"])
t = time.perf_counter()
em.run(jax.random.PRNGKey(0), x, K=K)
first = time.perf_counter() - t
n_programs, xla_s = len(xla), sum(xla)
warm = []
for _ in range(3):
    t = time.perf_counter()
    em.run(jax.random.PRNGKey(0), x, K=K)
    warm.append(time.perf_counter() - t)
print(json.dumps(dict(first=first, warm=min(warm), xla=xla_s, programs=n_programs)))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e4,1e5,1e6")
    ap.add_argument("--cov", default="full,diag")
    ap.add_argument("--f32", action="store_true")
    ap.add_argument("--bar", action="store_true", help="with the progress bar (the default API)")
    args = ap.parse_args()
    print(f"# GMM compile time in a fresh process, D=8, K=16, "
          f"{'float32' if args.f32 else 'float64'}, progress bar {'on' if args.bar else 'off'}, "
          f"{os.cpu_count()} CPU cores\n")
    print("| N | cov | first run s | warm run s | compile s | of which XLA s (programs) |")
    print("|---|---|---|---|---|---|")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        for cov in args.cov.split(","):
            cfg = dict(n=n, cov=cov, f32=args.f32, bar=args.bar,
                       dir=os.path.dirname(os.path.abspath(__file__)))
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {n:.0e} | {cov} | {r['first']:.2f} | {r['warm']:.2f} | "
                  f"{r['first'] - r['warm']:.2f} | {r['xla']:.2f} ({r['programs']}) |", flush=True)


if __name__ == "__main__":
    main()
