import jax
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss, matthews_corrcoef
from toy_models import ToyClassifier, toy_batches

from flaxlora.training import sharding
from flaxlora.training.evaluation import evaluate, make_eval_step


def test_evaluate_matches_scikit_learn_on_the_same_predictions():
    model = ToyClassifier(dropout=0.5)  # dropout must be off at eval
    batches = toy_batches(5, seed=3)
    params = model.init(jax.random.key(0), batches[0]["input_ids"], batches[0]["attention_mask"])["params"]
    step = make_eval_step(model)
    result = evaluate(model, params, batches, step=step)
    logits = np.concatenate([
        np.asarray(model.apply({"params": params}, b["input_ids"], b["attention_mask"]))[b["weights"] > 0]
        for b in batches
    ])
    labels = np.concatenate([b["labels"][b["weights"] > 0] for b in batches])
    pred = logits.argmax(-1)
    assert 0 < pred.sum() < len(pred), "degenerate predictions make a weak test"
    assert result["n"] == len(labels) == 5 * 14
    np.testing.assert_allclose(result["accuracy"], accuracy_score(labels, pred), rtol=1e-6)
    np.testing.assert_allclose(result["f1"], f1_score(labels, pred), rtol=1e-5)
    np.testing.assert_allclose(result["mcc"], matthews_corrcoef(labels, pred), rtol=1e-5, atol=1e-6)
    probs = jax.nn.softmax(logits)
    np.testing.assert_allclose(result["loss"], log_loss(labels, probs), rtol=1e-5)
    assert evaluate(model, params, batches, step=step) == result  # deterministic, reusable step


def test_evaluate_on_a_mesh_equals_single_device():
    model = ToyClassifier()
    batches = toy_batches(2, batch_size=16, seed=4)
    params = model.init(jax.random.key(0), batches[0]["input_ids"], batches[0]["attention_mask"])["params"]
    mesh = sharding.make_mesh(None, jax.devices()[:1])
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params)
    on_mesh = evaluate(model, jax.device_put(params, shardings), batches, mesh=mesh, param_shardings=shardings)
    plain = evaluate(model, params, batches)
    assert on_mesh["n"] == plain["n"]
    np.testing.assert_allclose(on_mesh["loss"], plain["loss"], rtol=1e-6)
    assert on_mesh["accuracy"] == plain["accuracy"]
