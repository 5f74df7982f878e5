"""The documentation site (mkdocs.yml, docs/) builds strictly, and its generated pages are what the code gives now:
a broken link, a missing anchor, a page left out of the nav, a config key or table column documented differently
from the code, or a benchmark result not on the benchmarks page fails here (issue 30). In process (MkDocs' own
build function, about a second): the unit tier starts no subprocess."""
import importlib.util
import os
import pathlib
import re
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _module(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(config_file: pathlib.Path, site_dir: pathlib.Path) -> None:
    """``mkdocs build --strict --site-dir site_dir``, in this process (raises mkdocs' Abort on any warning)."""
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config

    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # Material's end-of-life notice, printed on every build
    mkdocs_build(load_config(config_file=str(config_file), strict=True, site_dir=str(site_dir)))


def test_the_site_builds_strictly_with_every_page(tmp_path):
    build(REPO / "mkdocs.yml", tmp_path / "site")
    pages = {p.relative_to(REPO / "docs").with_suffix("").as_posix() for p in (REPO / "docs").rglob("*.md")}
    built = {p.parent.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {p for p in pages if p != "index"} <= built, sorted(pages - built - {"index"})
    for page in ("getting-started", "configuration", "tables", "troubleshooting", "design", "benchmarks",
                 "kuberay", "cluster", "analysts", "results", "lineage", "model-cards", "stages/import",
                 "stages/partition", "stages/train", "stages/score", "stages/evaluate", "stages/saliency",
                 "stages/pipeline"):
        assert page in pages, page


def test_a_broken_link_fails_the_build(tmp_path):
    """The strictness is real: the same site with one link to a page that does not exist does not build."""
    from mkdocs.exceptions import Abort

    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\nSee [the missing page](no-such-page.md).\n")
    with pytest.raises(Abort):
        build(tmp_path / "mkdocs.yml", tmp_path / "site")


def test_the_generated_pages_are_what_the_code_gives():
    """docs/configuration.md (from the config models) and docs/tables.md (from the schemas): `make docs`
    regenerates them; a committed page that differs is stale."""
    generate = _module(REPO / "docs" / "generate.py", "docs_generate")
    for name, make in generate.PAGES.items():
        assert (REPO / "docs" / name).read_text() == make(), f"docs/{name} is stale: run make docs"


def test_the_configuration_page_documents_every_key():
    """Every key of the config has a description (the models', so --help and the docs say the same) and a row."""
    from dermray.runtime.config import RunConfig

    generate = _module(REPO / "docs" / "generate.py", "docs_generate")
    text = (REPO / "docs" / "configuration.md").read_text()
    keys = generate.rows(RunConfig)
    assert len(keys) > 100
    for key, field in keys:
        assert field.description, f"{key}: no Field(description=...)"
        assert f"| `{key}` |" in text, key


def test_the_benchmarks_page_shows_every_result():
    """docs/benchmarks.md's tables are what benchmarks/report.py makes of benchmarks/results/ (`make
    bench-report`), each with the machine it was measured on."""
    report = _module(REPO / "benchmarks" / "report.py", "bench_report")
    page = (REPO / "docs" / "benchmarks.md").read_text()
    block = page[page.index(report.START):page.index(report.END) + len(report.END)]
    assert block == report.block(), "docs/benchmarks.md is stale: run make bench-report"
    for results in sorted((REPO / "benchmarks" / "results").glob("*/results.json")):
        name = results.parent.name
        assert f"`benchmarks/{name}.py`" in block or f"`benchmarks/results/{name}/`" in block, results
    assert block.count("Machine: ") == len(report.BENCHMARKS)


def test_the_readme_is_short_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "bench-report:start" not in readme  # the benchmark tables live on docs/benchmarks.md
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"
