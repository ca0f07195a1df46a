"""XLA's memory analysis of a compiled fit against the memory the run really takes (issue 15).

    python benchmarks/memory.py gmm          # GMM, N = 1e5, D = 8, K = 16, float64
    python benchmarks/memory.py hmm 100000   # categorical HMM, K = 16, V = 4, T = 1e5
    python benchmarks/memory.py hmm 20000 hard

One case per process: the resident set size is read before the run (after compiling) and its
peak after (``resource.getrusage``); their difference is what the run allocated.
"""

import json
import pathlib
import resource
import sys
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from shared_models import categorical_hmm  # noqa: E402

from bayes_em import EM, models  # noqa: E402
from bayes_em import em as core  # noqa: E402
from bayes_em.checks import check_compiled_memory, check_enumeration  # noqa: E402


def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024


def main(case, *rest):
    rng = np.random.default_rng(0)
    if case == "hmm":
        T, K, V = int(float(rest[0])) if rest else 100_000, 16, 4
        em = EM(categorical_hmm, max_iter=10, tol=0, hard="hard" in rest, memory_limit=1e12,
                progress_bar=False)
        args, kwargs = (rng.integers(0, V, T),), dict(K=K, V=V)
    else:
        N, D, K = 100_000, 8, 16
        x = rng.normal(size=(N, D)) + 3.0 * rng.integers(0, 4, (N, 1))
        em = EM(models.gmm, max_iter=10, tol=0, memory_limit=1e12, progress_bar=False)
        args, kwargs = (x,), dict(K=K)
    key = jax.random.PRNGKey(0)
    problem, functions, params0, data = em._prepare(key, {}, args, kwargs)
    bare = core.make_problem(em.model, problem.sites, problem.rebuild, em.max_iter, em.tol,
                             em.hard)
    pre = check_enumeration(bare, params0, data, float("inf"))
    start = time.perf_counter()
    compiled = functions["fit"].lower(params0, data, key).compile()
    xla = check_compiled_memory(compiled, float("inf"), problem, params0, data)
    compile_s = time.perf_counter() - start
    before = rss()
    jax.block_until_ready(functions["fit"](params0, data, key))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(case=" ".join((case, *rest)), precheck_mb=pre / 1e6,
                          xla_mb={k: v / 1e6 for k, v in xla.items()},
                          run_rss_mb=(peak - before) / 1e6, compile_s=compile_s)))


if __name__ == "__main__":
    main(*sys.argv[1:])
