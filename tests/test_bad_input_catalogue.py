"""A catalogue of bad inputs (issue 13): each one gets an error or a warning that names the
argument or site and says what to do; none runs on to a silently wrong fit."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

from bayes_em import EM, LBFGS, ModelError

KEY = jax.random.PRNGKey(0)
X = np.linspace(-3.0, 3.0, 80)


def mixture(x):
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    scale = numpyro.param("scale", jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("data", 80):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def free_plate_mixture(x):  # the plate follows the data
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def map_mixture(x):
    loc = numpyro.sample("loc", dist.Normal(jnp.zeros(2), 5.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def covariate_model(c, y):
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    beta = numpyro.param("beta", 0.0)
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("y", dist.Normal(loc[z] + beta * c, 1.0), obs=y)


def nested(x):  # x: (items, rows)
    p = numpyro.param("p", jnp.full((2, 3), 0.5), constraint=constraints.unit_interval)
    with numpyro.plate("rows", 40, dim=-1):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        with numpyro.plate("items", 3, dim=-2):
            numpyro.sample("x", dist.Bernoulli(p[z, jnp.arange(3)[:, None]]), obs=x)


def family(obs_dist):
    def model(y):
        rate = numpyro.param("rate", jnp.array([1.0, 3.0]), constraint=constraints.positive)
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("y", obs_dist(rate[z]), obs=y)
    return model


def python_if(x):
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        m = loc[1] if z.sum() > 3 else loc[0]
        numpyro.sample("x", dist.Normal(m, 1.0), obs=x)


def python_int(x):
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
    numpyro.sample("x", dist.Normal(loc[int(z)], 1.0), obs=x)


def numpy_on_latent(x):
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(np.asarray(loc)[np.asarray(z)], 1.0), obs=x)


def duplicate_names(x):
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)
        numpyro.sample("x", dist.Normal(loc[z], 2.0), obs=x)


def no_latent(x):
    loc = numpyro.param("loc", 0.0)
    numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def improper_latent(x):
    loc = numpyro.sample("loc", dist.ImproperUniform(constraints.real, (), ()))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(loc + z, 1.0), obs=x)


def poisson_latent(x):
    loc = numpyro.param("loc", 0.0)
    with numpyro.plate("data", x.shape[0]):
        n = numpyro.sample("n", dist.Poisson(3.0))
        numpyro.sample("x", dist.Normal(loc + n, 1.0), obs=x)


def param_in_scan(y):
    def step(z_prev, y_t):
        trans = numpyro.param("trans", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Normal(z * 1.0, 1.0), obs=y_t)
        return z, None

    scan(step, 0, y)


def no_param(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(z * 1.0, 1.0), obs=x)


def latent_parent_of_map(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        m = numpyro.sample("m", dist.Normal(z * 1.0, 1.0))
        numpyro.sample("x", dist.Normal(m, 1.0), obs=x)


def many_global_latents(x):
    loc = numpyro.param("loc", 0.0)
    total = 0.0
    for i in range(30):
        total = total + numpyro.sample(f"b{i}", dist.Bernoulli(0.5))
    numpyro.sample("x", dist.Normal(loc + total, 1.0), obs=x)


def big_enumeration(x):
    loc = numpyro.param("loc", jnp.zeros(64))
    with numpyro.plate("data", x.shape[0]):
        a = numpyro.sample("a", dist.Categorical(jnp.ones(64) / 64))
        b = numpyro.sample("b", dist.Categorical(jnp.ones(64) / 64))
        numpyro.sample("x", dist.Normal(loc[a] + loc[b], 1.0), obs=x)


def unused_param(x):
    numpyro.param("spare", jnp.ones(3))
    free_plate_mixture(x)


def substituted(x):
    from numpyro import handlers

    with handlers.substitute(data={"loc": jnp.array([-2.0, 2.0])}):
        free_plate_mixture(x)


def substituted_latent(x):
    from numpyro import handlers

    with handlers.substitute(data={"z": jnp.zeros(x.shape[0], int)}):
        free_plate_mixture(x)


def subsampled(x):
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0], subsample_size=10) as idx:
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x[idx])


def run(model, *args, **options):
    options = {"progress_bar": False, "max_iter": 3, **options}
    return EM(model, **options).run(KEY, *args)


# (id, call, exception, message pattern)
CASES = [
    # --- options -------------------------------------------------------------------------------
    ("tol-string", lambda: EM(mixture, tol="1e-6"), TypeError, "tol"),
    ("tol-negative", lambda: EM(mixture, tol=-1.0), ValueError, "tol"),
    ("tol-nan", lambda: EM(mixture, tol=float("nan")), ValueError, "tol"),
    ("memory-limit-string", lambda: EM(mixture, memory_limit="2GB"), TypeError, "memory_limit"),
    ("memory-limit-zero", lambda: EM(mixture, memory_limit=0), ValueError, "memory_limit"),
    ("restart-noise-nan", lambda: EM(mixture, restart_noise=float("nan")), ValueError,
     "restart_noise"),
    ("restart-noise-negative", lambda: EM(mixture, restart_noise=-1.0), ValueError,
     "restart_noise"),
    ("restarts-zero", lambda: EM(mixture, restarts=0), ValueError, "restarts"),
    ("restarts-float", lambda: EM(mixture, restarts=1.5), ValueError, "restarts"),
    ("max-iter-zero", lambda: EM(mixture, max_iter=0), ValueError, "max_iter"),
    ("max-iter-string", lambda: EM(mixture, max_iter="10"), ValueError, "max_iter"),
    ("init-unknown", lambda: EM(mixture, init="kmeans"), ValueError, "init must be"),
    ("mstep-string", lambda: EM(mixture, mstep="lbfgs"), ValueError, "mstep"),
    ("mstep-zero-steps", lambda: EM(mixture, mstep=LBFGS(max_steps=0)), ValueError, "mstep"),
    ("init-values-list", lambda: EM(mixture, init_values=[1, 2]), TypeError, "init_values"),
    ("fixed-string", lambda: EM(mixture, fixed="loc"), TypeError, "fixed"),
    ("missing-number", lambda: EM(mixture, missing=3), TypeError, "missing"),
    # --- data ----------------------------------------------------------------------------------
    ("nan-data", lambda: run(mixture, np.where(X > 2, np.nan, X)), ModelError, "'x'.*NaN"),
    ("inf-data", lambda: run(mixture, np.where(X > 2, np.inf, X)), ModelError, "'x'"),
    ("string-data", lambda: run(mixture, np.array(["a"] * 80)), TypeError, "dtype"),
    ("object-data", lambda: run(mixture, np.array([object()] * 80)), TypeError, "dtype"),
    ("bool-data-for-normal", lambda: run(mixture, X > 0), ModelError, "'x'.*boolean"),
    ("length-one-broadcast", lambda: run(mixture, np.ones(1)), ModelError, "plate 'data'"),
    ("column-for-univariate", lambda: run(mixture, X[:, None]), ModelError, "'x'"),
    ("plate-size-mismatch", lambda: run(mixture, X[:50]), ModelError, "'x'|plate"),
    ("nested-plate-transposed", lambda: run(nested, np.ones((40, 3))), ModelError, "'x'|[Ss]hape"),
    ("empty-data", lambda: run(free_plate_mixture, np.zeros(0)), ModelError, "empty"),
    ("all-nan-with-missing", lambda: run(free_plate_mixture, np.full(10, np.nan),
                                         missing=("x",)), ModelError, "'x'"),
    ("missing-names-latent", lambda: run(free_plate_mixture, X, missing=("z",)), ModelError, "'z'"),
    ("nan-covariate", lambda: run(covariate_model, np.where(X > 2, np.nan, X), X), ModelError,
     r"argument.*NaN"),
    ("poisson-negative", lambda: run(family(dist.Poisson), -np.ones(10)), ModelError,
     "'y'.*support"),
    ("poisson-fractional", lambda: run(family(dist.Poisson), np.full(10, 2.5)), ModelError,
     "'y'.*support"),
    ("exponential-negative", lambda: run(family(dist.Exponential), -np.ones(10)), ModelError,
     "'y'.*support"),
    ("bernoulli-half", lambda: run(family(lambda r: dist.Bernoulli(r / (1 + r))), np.full(10, 0.5)),
     ModelError, "'y'.*support"),
    ("categorical-out-of-range", lambda: run(family(lambda r: dist.Categorical(
        jnp.stack([r, 1 + 0 * r], -1) / (1 + r)[..., None])), np.full(10, 5)), ModelError,
     "'y'.*support"),
    # --- model structure -------------------------------------------------------------------------
    ("no-latent", lambda: run(no_latent, X), ModelError, "no discrete latent"),
    ("improper-prior", lambda: run(improper_latent, X), ModelError, "'loc'.*no prior"),
    ("poisson-latent", lambda: run(poisson_latent, X), ModelError, "'n'.*enumerate"),
    ("param-in-scan", lambda: run(param_in_scan, X), ModelError, "'trans'.*scan"),
    ("python-if-on-latent", lambda: run(python_if, X), ModelError, "Python.*jnp.where"),
    ("int-of-latent", lambda: run(python_int, np.array(0.5)), ModelError, "int()"),
    ("numpy-on-latent", lambda: run(numpy_on_latent, X), ModelError, "NumPy"),
    ("substitute-on-fitted-site", lambda: run(substituted, X), ModelError,
     r"'loc'.*fixed="),
    ("substitute-on-latent", lambda: run(substituted_latent, X), ModelError, r"'z'.*substitute"),
    ("duplicate-site-names", lambda: run(duplicate_names, X), ModelError, "'x'"),
    ("no-parameter", lambda: run(no_param, X), ModelError, "no parameter"),
    ("continuous-child-of-latent", lambda: run(latent_parent_of_map, X), ModelError, "'m'"),
    ("too-many-global-latents", lambda: run(many_global_latents, np.array(0.5)), ModelError,
     "Too many enumerated"),
    ("enumeration-over-memory", lambda: run(big_enumeration, X, memory_limit=2**20), MemoryError,
     "'x'"),
    # --- initial and fixed values ----------------------------------------------------------------
    ("init-wrong-shape", lambda: run(mixture, X, init_values={"loc": np.zeros(3)}), ModelError,
     r"init_values\['loc'\].*shape"),
    ("init-map-wrong-shape", lambda: run(map_mixture, X, init_values={"loc": np.zeros(3)}),
     ModelError, r"init_values\['loc'\]"),
    ("init-unknown-site", lambda: run(mixture, X, init_values={"mean": np.zeros(2)}), ModelError,
     "mean"),
    ("init-negative-scale", lambda: run(mixture, X, init_values={"scale": -np.ones(2)}),
     ModelError, "'scale'"),
    ("init-nan", lambda: run(mixture, X, init_values={"loc": np.array([np.nan, 1.0])}),
     ModelError, "'loc'"),
    ("init-not-simplex", lambda: run(mixture, X, init_values={"w": np.array([0.5, 0.7])}),
     ModelError, "'w'"),
    ("fixed-unknown-site", lambda: run(mixture, X, fixed={"mean": 1.0}), ModelError, "mean"),
    ("fixed-negative-scale", lambda: run(mixture, X, fixed={"scale": -np.ones(2)}), ModelError,
     r"fixed\['scale'\]"),
    ("fixed-nan", lambda: run(mixture, X, fixed={"loc": np.array([np.nan, 1.0])}), ModelError,
     r"'loc'"),
    ("impossible-data-at-start", lambda: run(family(dist.Exponential), np.ones(10),
                                             init_values={"rate": np.array([np.inf, 1.0])}),
     ModelError, "'rate'"),
    ("callable-init-unknown-site", lambda: run(mixture, X, restarts=2,
                                               init=lambda k, p: {"mean": 0.0}), ValueError,
     "'mean'"),
    ("subsampling-plate", lambda: run(subsampled, X), ModelError,
     r"Plate 'data' subsamples 10 of its 80 rows.*OnlineEM"),
    ("e-step-wrong-shape", lambda: EM(mixture, progress_bar=False).e_step(
        {"loc": np.zeros(3)}, X), ModelError, r"'loc'"),
]


@pytest.mark.parametrize("call, exception, pattern", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_named(call, exception, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exception, match=pattern):
            call()


def test_float64_beyond_float32_range_is_named():
    with jax.enable_x64(False):
        with pytest.raises(ModelError, match="float32's range"):
            run(free_plate_mixture, np.array([1e300, 0.0, 1.0]))


def test_unused_parameter_warns():
    with pytest.warns(UserWarning, match="'spare' is used by no sample site"):
        run(unused_param, X)


def test_catalogue_is_large():
    assert len(CASES) + 2 >= 60
