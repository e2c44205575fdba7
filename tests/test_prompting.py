import numpy as np
import pytest

from flaxlora.qqp import prompting


def test_chat_prompt_and_demonstrations():
    q1s = [f"first {i}?" for i in range(10)]
    q2s = [f"second {i}?" for i in range(10)]
    labels = np.array([0, 1] * 5)
    demos = prompting.pick_demonstrations(q1s, q2s, labels, shots=4, seed=1)
    assert sorted(d[2] for d in demos) == [0, 0, 1, 1]
    assert demos == prompting.pick_demonstrations(q1s, q2s, labels, shots=4, seed=1)
    prompt = prompting.chat_prompt("Is it A?", "Is it B?", demos)
    assert prompt.count("<|im_start|>user") == 5 and prompt.count("<|im_start|>assistant\n") == 5
    assert prompt.endswith("Question 2: Is it B?<|im_end|>\n<|im_start|>assistant\n")
    for d1, d2, label in demos:
        assert f"Question 1: {d1}\nQuestion 2: {d2}<|im_end|>\n<|im_start|>assistant\n{'Yes' if label else 'No'}" in prompt


def test_yes_no_margin_reads_the_answer_logits(smollm2, minilm):
    same = prompting.chat_prompt("What is the capital of France?", "What is France's capital city?")
    margins = prompting.yes_no_margin(smollm2, [same, same, prompting.chat_prompt("How do I bake bread?", "Who won the 2010 World Cup?")])
    assert margins.shape == (3,) and np.all(np.isfinite(margins))
    assert margins[0] == pytest.approx(margins[1], abs=1e-4)  # padding and batching change nothing
    assert margins[0] > margins[2]  # a paraphrase looks more like "Yes" than an unrelated pair
    with pytest.raises(ValueError, match="decoder with tied embeddings"):
        prompting.yes_no_margin(minilm, [same])
