"""flaxlora's default XLA flags: added to XLA_FLAGS on import, never over a flag the user set."""

import os
import subprocess
import sys

from flaxlora.xla_flags import DEFAULT_FLAGS, with_defaults

SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"


def test_defaults_are_added_to_other_flags():
    assert with_defaults("") == " ".join(DEFAULT_FLAGS)
    assert with_defaults(" --xla_force_host_platform_device_count=4 ").split() == [
        "--xla_force_host_platform_device_count=4", *DEFAULT_FLAGS]


def test_a_flag_the_user_set_is_kept():
    assert with_defaults(f"{SCHEDULER}=true") == f"{SCHEDULER}=true"
    assert with_defaults(f"--a=1 {SCHEDULER}=true --b") == f"--a=1 {SCHEDULER}=true --b"


def test_importing_flaxlora_sets_them_before_jax_starts():
    code = ("import os, flaxlora, jax; jax.numpy.zeros(1).block_until_ready(); "
            "print(os.environ['XLA_FLAGS'])")
    for given, expected in [("", f"{SCHEDULER}=false"), (f"{SCHEDULER}=true", f"{SCHEDULER}=true")]:
        env = {**os.environ, "XLA_FLAGS": given, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [expected]
