import jax
from toy_models import toy_setup

import flaxlora


def test_summary_counts_trainable_and_total():
    _, params, _ = toy_setup()
    config = flaxlora.LoraConfig(rank=2, targets=r"(query|ffn)/kernel$", trainable=r"^head/")
    lora = flaxlora.init_lora(params, config, jax.random.key(0))
    extras = flaxlora.trainable_params(params, config)
    summary = flaxlora.summarize(params, lora, config, extras)
    base = sum(x.size for x in jax.tree.leaves(params))
    query_adapter = 16 * 2 + 2 * 4 * 8
    ffn_adapter = 16 * 2 + 2 * 32
    head = 32 * 2 + 2
    assert summary.base == base
    assert summary.adapter == query_adapter + ffn_adapter
    assert summary.trainable == query_adapter + ffn_adapter + head
    assert summary.total == base + query_adapter + ffn_adapter
    assert [(r[0], r[2], r[3]) for r in summary.rows] == [("ffn/kernel", 2, ffn_adapter), ("query/kernel", 2, query_adapter)]
    text = str(summary)
    assert "query/kernel" in text and f"{summary.trainable:,}" in text
