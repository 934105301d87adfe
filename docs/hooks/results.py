"""MkDocs hook: serve the committed benchmark plots (benchmarks/results/*.png) in the site.

MkDocs only serves files under docs_dir. Rather than keep copies of the plots under docs/,
this hook adds every PNG in benchmarks/results/ to the site at the same relative path, so
docs/performance.md embeds ``benchmarks/results/<name>.png`` and links resolve under --strict
in a fresh clone.
"""
from __future__ import annotations

import pathlib

from mkdocs.structure.files import File, Files


def on_files(files: Files, config) -> Files:  # noqa: ANN001 (MkDocs' hook signature)
    """Adds benchmarks/results/*.png to the site's files, at the same path."""
    root = pathlib.Path(config["config_file_path"]).resolve().parent
    for png in sorted((root / "benchmarks" / "results").glob("*.png")):
        files.append(File(png.relative_to(root).as_posix(), src_dir=str(root), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
