"""The seed tree: streams named by their path, and the salted streams older products keep."""
import numpy as np

from galdecomp.seeds import SALTS, salted, seed_sequence, stream


def test_a_stream_depends_on_its_path_only():
    a = stream(3, "report", "split").standard_normal(5)
    stream(3, "report", "r2").standard_normal(100)  # another stream drawn in between
    assert np.array_equal(a, stream(3, "report", "split").standard_normal(5))
    assert not np.array_equal(a, stream(4, "report", "split").standard_normal(5))
    assert not np.array_equal(a, stream(3, "report", "r2").standard_normal(5))
    assert seed_sequence(3, "mgvi", 7).spawn_key[-1] == 7  # an integer name is its own key


def test_salted_streams_are_the_generators_the_products_were_released_with():
    """Named salts replace literals such as default_rng([seed, 8101]): the same numbers."""
    assert SALTS["generate/draws"] == 8101 and SALTS["posterior_check/importance"] == 17
    for name, salt in SALTS.items():
        assert np.array_equal(salted(5, name).random(4), np.random.default_rng([5, salt]).random(4))
    assert np.array_equal(salted(5, "posterior_check/importance", 2).random(4),
                          np.random.default_rng([5, 17, 2]).random(4))
    assert len(set(SALTS.values())) == len(SALTS)
