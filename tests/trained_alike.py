"""Two runs' weights compared as alike: the same up to rounding, which Adam may turn into a few large differences."""


def assert_trained_alike(got: dict, expected: dict, atol: float, strays: int = 10) -> None:
    """Two runs' weights (name -> tensor) are the same up to rounding: within `atol`, but for at most `strays` weights.

    Adam moves a weight by about the learning rate whatever the size of its gradient, so a gradient within rounding of 0
    (another order of a float sum: sharded or not, one process or two, another CPU) may take a weight the other way:
    seen, 1 weight of 1 M apart by 2e-4 after 2 steps at --lr 1e-2. A wrong gradient takes thousands apart.
    """
    assert got.keys() == expected.keys()
    apart = {key: int(((got[key] - expected[key]).abs() > atol).sum()) for key in expected}
    assert sum(apart.values()) <= strays, f"weights apart by more than {atol}: {({k: n for k, n in apart.items() if n})}"
