import pytest

from raugment.core.registry import Registry


def test_register_get_and_helpful_error():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a
    assert reg.names() == ["a"] and "a" in reg
    with pytest.raises(ValueError, match=r"unknown widget 'b'; known: a"):
        reg.get("b")


def test_double_registration_refused():
    reg = Registry("widget")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)


def test_lazy_module_import():
    reg = Registry("schema-ish", ("json",))
    with pytest.raises(ValueError, match="known: \\(none\\)"):
        reg.get("x")
