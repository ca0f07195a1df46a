"""Time to the optimum, compile included: bayes_em against NumPyro's route today (SVI with
TraceEnum_ELBO and Adam at several learning rates) on the same maximum-likelihood mixture.

    python benchmarks/numpyro_svi.py

The model has only numpyro.param sites, so SVI with an empty guide maximises exactly the same
objective, log p(x | θ) with the latents enumerated (for MAP sites AutoDelta would differ by the
Jacobian of its transforms). SVI "reaches" the optimum when its loss is within 1e-6 (relative)
of bayes_em's final objective.

Each timed fit runs in a fresh Python process, so both pay their compilation: SVI.run jits a new
closure on every call, so a second call in the same process compiles again and cannot serve as a
"warm" reference. The number of SVI steps needed is found from a long run first; a fresh process
then runs exactly that many.
"""

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.contrib.funsor import config_enumerate  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402
from numpyro.infer import SVI, TraceEnum_ELBO  # noqa: E402

from bayes_em import EM  # noqa: E402


def mixture(x, K=3):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))
    scale = numpyro.param("scale", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def data():
    rng = np.random.default_rng(0)
    z = rng.choice(3, size=2000, p=[0.5, 0.3, 0.2])
    return jnp.asarray(np.array([-3.0, 0.5, 4.0])[z]
                       + np.array([1.0, 0.6, 0.8])[z] * rng.normal(size=2000))


def svi_run(x, lr, n_steps):
    svi = SVI(config_enumerate(mixture), lambda x: None, numpyro.optim.Adam(lr),
              TraceEnum_ELBO(max_plate_nesting=1))
    out = svi.run(jax.random.PRNGKey(0), n_steps, x, progress_bar=False)
    return np.asarray(jax.block_until_ready(out.losses))


def one(argv):
    """Child process: one timed fit, compile included, after the backend is up."""
    x = data()
    jnp.ones(1).block_until_ready()
    t = time.perf_counter()
    if argv[0] == "em":
        result = EM(mixture, max_iter=1000, tol=1e-10, progress_bar=False).run(
            jax.random.PRNGKey(0), x)
        out = dict(seconds=time.perf_counter() - t, steps=int(result.n_iter),
                   objective=float(result.objective))
    else:
        losses = svi_run(x, float(argv[1]), int(argv[2]))
        out = dict(seconds=time.perf_counter() - t, steps=int(argv[2]),
                   objective=float(-losses[-1]))
    print(json.dumps(out))


def fresh(*argv):
    """Run :func:`one` in a fresh Python process (nothing compiled or cached yet)."""
    out = subprocess.run([sys.executable, __file__, "--one", *map(str, argv)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    em = fresh("em")
    target = em["objective"]
    print(f"# Time to the optimum, compile included, each fit in a fresh process (N=2000, K=3, "
          f"jax {jax.__version__}, {os.cpu_count()} cores)\n")
    print("| method | steps to the optimum | time to optimum s (fresh process, compile included) "
          "| final objective |")
    print("|---|---|---|---|")
    print(f"| bayes_em EM | {em['steps']} iterations | {em['seconds']:.2f} | {target:.4f} |")
    x = data()
    n_steps = 5000
    for lr in (0.003, 0.01, 0.03, 0.1):
        # how many steps SVI needs (a long run here), then exactly that many in a fresh process
        losses = svi_run(x, lr, n_steps)
        hit = np.flatnonzero(-losses >= target - 1e-6 * abs(target))
        if not hit.size:
            print(f"| SVI Adam lr={lr} | not reached in {n_steps} steps | – | {-losses[-1]:.4f} |")
            continue
        svi = fresh("svi", lr, int(hit[0]) + 1)
        print(f"| SVI Adam lr={lr} | {svi['steps']} | {svi['seconds']:.2f} | "
              f"{svi['objective']:.4f} |",
              flush=True)


if __name__ == "__main__":
    if "--one" in sys.argv:
        one(sys.argv[sys.argv.index("--one") + 1:])
    else:
        main()
