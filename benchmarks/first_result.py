"""Time to the first result in a fresh process: a three-coin fit (Collins 1997 data) after the
imports, without and with JAX's persistent compilation cache (``bayes_em.compilation_cache``):
a cold cache (first process, compiles and writes) and a warm one (a second process, loads).

    python benchmarks/first_result.py [--repeats 3]

Each number is the median over ``--repeats`` fresh processes; imports are timed apart. Also
reported: the CPU seconds of the fit (all threads: steadier than wall time on a shared machine),
the XLA programs it compiles or loads from the cache (3 of them are the script's own
``jnp.array`` and ``PRNGKey``) and how often the model function was traced.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import os, time, json
t0 = time.perf_counter()
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpyro, numpyro.distributions as dist
from numpyro.distributions import constraints
import bayes_em
from bayes_em import EM
programs, traces = [], [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **_: programs.append(d) if e == "/jax/core/compile/backend_compile_duration"
    else None)
t1, c1 = time.perf_counter(), time.process_time()

def three_coins(y):
    traces[0] += 1
    pi = numpyro.param("pi", 0.4, constraint=constraints.unit_interval)
    p = numpyro.param("p", 0.6, constraint=constraints.unit_interval)
    q = numpyro.param("q", 0.7, constraint=constraints.unit_interval)
    with numpyro.plate("tosses", y.shape[0]):
        a = numpyro.sample("a", dist.Bernoulli(pi))
        numpyro.sample("y", dist.Bernoulli(jnp.where(a == 1, p, q)), obs=y)

y = jnp.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1], dtype=jnp.float64)
r = EM(three_coins, tol=1e-8, progress_bar=False).run(jax.random.PRNGKey(0), y)
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"imports": t1 - t0, "fit": t2 - t1, "cpu": c2 - c1, "programs": len(programs),
                  "traces": traces[0], "pi": float(r.params["pi"])}))
"""


def child(env):
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    base.pop("BAYES_EM_COMPILATION_CACHE", None)
    rows = {"no cache": [], "cold cache (first process)": [], "warm cache (second process)": []}
    for _ in range(args.repeats):
        rows["no cache"].append(child(base))
        with tempfile.TemporaryDirectory() as d:
            env = {**base, "BAYES_EM_COMPILATION_CACHE": d}
            rows["cold cache (first process)"].append(child(env))
            rows["warm cache (second process)"].append(child(env))
    print(f"# Three-coin fit in a fresh process (median of {args.repeats}, {os.cpu_count()} "
          "cores)\n")
    print("| process | imports s | fit after imports s | fit CPU s | XLA programs | "
          "model traces |")
    print("|---|---|---|---|---|---|")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("imports", "fit", "cpu", "programs", "traces")}
        print(f"| {name} | {med['imports']:.2f} | {med['fit']:.3f} | {med['cpu']:.3f} | "
              f"{med['programs']:.0f} | {med['traces']:.0f} |")
    pis = {round(r["pi"], 10) for runs in rows.values() for r in runs}
    print(f"\nfitted pi identical across processes: {len(pis) == 1}")


if __name__ == "__main__":
    main()
