"""The documentation's Python examples run as written, and its API reference covers every public name
(docs/ops.md's op table is checked by test_package.py).

Every ```python block of README.md and docs/**/*.md runs, in order, the blocks of one file
sharing one namespace (a guide builds on its earlier blocks). A block preceded by an HTML
comment starting with ``<!-- no-run`` is shown but not run (it needs torchrun, a GPU, ...);
the comment says why, and there are few of them.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import re

import pytest
import torch

import natgrad

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"(<!--\s*no-run[^>]*-->\s*\n)?```python\n(.*?)```", flags=re.S)
#: The subpackages whose __all__ the API reference documents, and the page that renders each.
API_PAGES = {
    "natgrad": "natgrad.md", "natgrad.optim": "optim.md", "natgrad.regularizers": "regularizers.md",
    "natgrad.fisher": "fisher.md", "natgrad.solvers": "solvers.md", "natgrad.stats": "stats.md",
    "natgrad.likelihoods": "likelihoods.md", "natgrad.curvature": "curvature.md",
    "natgrad.distributed": "distributed.md", "natgrad.ops": "ops.md",
    "natgrad.integrations.avalanche": "integrations.md", "natgrad.integrations.laplace": "integrations.md",
    "natgrad.integrations.transformers": "integrations.md",
}


def _blocks(page: pathlib.Path) -> list[tuple[bool, str]]:
    return [(bool(skip), code) for skip, code in FENCE.findall(page.read_text(encoding="utf-8"))]


def _rel(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=_rel)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace = {"__name__": "docs_example"}
    state = torch.random.get_rng_state()
    try:
        for skip, code in _blocks(page):
            if not skip:
                exec(compile(code, str(page), "exec"), namespace)
    finally:
        torch.random.set_rng_state(state)


def test_every_page_with_code_has_a_runnable_block_and_few_exceptions():
    blocks = [b for p in PAGES for b in _blocks(p)]
    skipped = [code for skip, code in blocks if skip]
    assert len(blocks) >= 15 and len(skipped) <= 3, (len(blocks), len(skipped))


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def _public(module_name: str) -> list[tuple[str, object]]:
    """The public names of ``module_name`` that the API reference documents (not submodules)."""
    module = importlib.import_module(module_name)
    return [(name, getattr(module, name)) for name in module.__all__
            if not name.startswith("__") and not inspect.ismodule(getattr(module, name))]


def _resolve(path: str) -> object:
    """The object a dotted path names (a module, or an attribute of one)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _rendered(paths: set[str]) -> tuple[set[int], set[str]]:
    """Ids of the objects the API pages render (a module directive renders its __all__)."""
    objects: set[int] = set()
    modules: set[str] = set()
    for path in paths:
        obj = _resolve(path)
        objects.add(id(obj))
        if inspect.ismodule(obj) and hasattr(obj, "__all__"):
            modules.add(obj.__name__)
            objects.update(id(getattr(obj, name)) for name in obj.__all__)
    return objects, modules


def _documented(obj: object) -> bool:
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return bool(inspect.getdoc(obj))
    return True  # constants are documented by their module's docstring or a #: comment


@pytest.mark.parametrize("module_name", sorted(API_PAGES))
def test_api_reference_renders_every_public_name(module_name):
    """Every public class, function and constant of the subpackage is rendered by some API page
    (as itself or under another public path), and has a docstring, so no entry is empty."""
    directives = {d for page in (DOCS / "api").glob("*.md")
                  for d in re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), flags=re.M)}
    rendered, _ = _rendered(directives)
    for name, obj in _public(module_name):
        if isinstance(obj, (str, int, float, tuple, frozenset, dict)):
            page = (DOCS / "api" / API_PAGES[module_name]).read_text(encoding="utf-8")
            assert f"::: {module_name}" in page, f"constant {module_name}.{name}: its module is not rendered"
            continue
        assert id(obj) in rendered, f"{module_name}.{name} is public but no docs/api page renders it"
        assert _documented(obj), f"{module_name}.{name} has no docstring"


def test_api_reference_covers_every_subpackage():
    subpackages = {f"natgrad.{name}" for name, obj in _public("natgrad") if inspect.ismodule(obj)}
    assert subpackages | {"natgrad"} <= set(API_PAGES), sorted(subpackages - set(API_PAGES))
    for module_name in API_PAGES:
        importlib.import_module(module_name)


@pytest.mark.skipif(not os.environ.get("NATGRAD_DOCS_SITE"), reason="set NATGRAD_DOCS_SITE to a built site")
def test_built_site_has_an_anchor_for_every_public_name():
    """scripts/test.sh builds the site first and sets NATGRAD_DOCS_SITE: every public class and
    function has a heading (an ``id``) in the built API reference, under one of its paths."""
    site = pathlib.Path(os.environ["NATGRAD_DOCS_SITE"])
    ids = {i for html in (site / "api").rglob("index.html")
           for i in re.findall(r'id="(natgrad[\w.]*)"', html.read_text(encoding="utf-8"))}
    anchored = set()
    for path in ids:
        try:
            anchored.add(id(_resolve(path)))
        except (ImportError, AttributeError):
            continue
    for module_name in API_PAGES:
        for name, obj in _public(module_name):
            if inspect.isclass(obj) or inspect.isroutine(obj):
                assert id(obj) in anchored, f"{module_name}.{name} has no heading in the built API reference"


def test_version_is_the_newest_changelog_release():
    """natgrad.__version__ (csrc/version.h) is the newest released section of CHANGELOG.md."""
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, flags=re.M)
    assert re.search(r"^## \[Unreleased\]$", changelog, flags=re.M)
    assert released, "CHANGELOG.md has no released version"
    assert natgrad.__version__ == released[0]
