"""Every public function and class of the modules a user imports documents its arguments and
what it returns, as keras.applications does (``Args:`` / ``Returns:`` sections)."""

import importlib
import inspect

import pytest

PUBLIC_MODULES = (
    "keras_dmr",
    "keras_dmr.analysis",
    "keras_dmr.convert",
    "keras_dmr.data",
    "keras_dmr.export",
    "keras_dmr.models",
    "keras_dmr.prune",
    "keras_dmr.tuning",
)


def _parameters(function) -> list[str]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    skip = {"self", "args", "kwargs", "deprecated"}
    return [name for name in signature.parameters if name not in skip]


def missing_sections(obj) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        # A constructor inherited from Keras (ResidualClassifier's) documents itself there; once
        # other tests have built Functional models its signature reads differently, so only the
        # package's own constructors are held to the rule.
        own = (getattr(obj.__init__, "__module__", None) or "").startswith("keras_dmr")
        return ["Args"] if own and _parameters(obj.__init__) and "Args:" not in doc else []
    missing = ["Args"] if _parameters(obj) and "Args:" not in doc else []
    return missing + ([] if "Returns:" in doc or "Yields:" in doc else ["Returns"])


def public_objects():
    seen = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) in seen or not callable(obj):
                continue
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            seen.add(id(obj))
            yield f"{module_name}.{name}", obj


def test_public_api_documents_arguments_and_results():
    undocumented = {name: gaps for name, obj in public_objects() if (gaps := missing_sections(obj))}
    assert not undocumented, undocumented


@pytest.mark.parametrize(
    "doc, gaps",
    [
        ('"""Adds."""', ["Args", "Returns"]),
        ('"""Adds.\n\n    Args:\n        a: x.\n    """', ["Returns"]),
        ('"""Adds.\n\n    Args:\n        a: x.\n\n    Returns:\n        y.\n    """', []),
    ],
)
def test_the_check_sees_a_missing_section(doc, gaps):
    namespace = {}
    exec(f"def add(a):\n    {doc}\n", namespace)
    assert missing_sections(namespace["add"]) == gaps
