import jax

# Correctness tests run in float64; the library itself works in float32 and float64.
jax.config.update("jax_enable_x64", True)
