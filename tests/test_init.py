import flaxlora


def test_every_public_name_resolves():
    missing = [name for name in flaxlora.__all__ if getattr(flaxlora, name, None) is None]
    assert missing == []
    assert callable(flaxlora.restore) and callable(flaxlora.load_pretrained)
