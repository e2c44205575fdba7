"""Load time and peak memory of `load_pretrained` for the offline models.

Each model is loaded in a fresh process so that peak RSS is its own:

    python experiments/bench_load.py [minilm-l6 smollm2-135m ...]
"""

import argparse
import json
import subprocess
import sys
import time


def measure(name: str) -> dict:
    """Imports, loads `name`, runs one jitted forward pass on a small batch; times each step."""
    start = time.perf_counter()
    import jax

    from flaxlora.loading import load_pretrained
    from flaxlora.qqp.reporting import peak_rss_mib

    imported, rss_imported = time.perf_counter(), peak_rss_mib()
    pretrained = load_pretrained(name)
    jax.block_until_ready(pretrained.params)
    loaded = time.perf_counter()
    batch = pretrained.tokenizer(["How do I learn JAX?"] * 8, ["What is the best way to learn JAX?"] * 8,
                                 padding="max_length", max_length=64, return_tensors="np")
    forward = jax.jit(pretrained.model.apply)
    logits = forward({"params": pretrained.params}, batch["input_ids"], batch["attention_mask"])
    jax.block_until_ready(logits)
    first_call = time.perf_counter()
    return {
        "model": name,
        "params_M": sum(x.size for x in jax.tree.leaves(pretrained.params)) / 1e6,
        "import_s": round(imported - start, 2),
        "load_s": round(loaded - imported, 2),
        "first_forward_s (compile, batch 8 x 64)": round(first_call - loaded, 2),
        "peak_rss_after_import_MiB": round(rss_imported),
        "peak_rss_after_load_MiB": round(peak_rss_mib()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", default=["minilm-l6", "smollm2-135m"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.models[0])))
        return
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--child", name], check=True,
                             capture_output=True, text=True).stdout
        print(json.dumps(json.loads(out.splitlines()[-1]), indent=1))


if __name__ == "__main__":
    main()
