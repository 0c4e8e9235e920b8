"""The app role's controller scripts (roles/app/files), run as the role runs them: the
controller's Python on the paths of a release's sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FILES = Path(__file__).resolve().parents[2] / "roles" / "app" / "files"


def run(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, FILES / script, *args], capture_output=True, text=True, check=False
    )


def sources(root: Path, handler: str = "async def main(ws):\n    pass\n") -> Path:
    package = root / "myservice"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "handlers.py").write_text(handler)
    return root


def test_the_source_hash_names_the_sources_not_their_bytecode(tmp_path: Path) -> None:
    """The same files hash the same wherever they are; bytecode does not count; a changed
    byte or a renamed file is another hash."""
    one, two = sources(tmp_path / "one"), sources(tmp_path / "two")
    first = run("source_hash.py", one / "myservice")
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.strip()) == 12
    (two / "myservice" / "__pycache__").mkdir()
    (two / "myservice" / "__pycache__" / "handlers.cpython-311.pyc").write_bytes(b"\0")
    assert run("source_hash.py", two / "myservice").stdout == first.stdout
    (two / "myservice" / "handlers.py").write_text("async def main(ws):\n    pass  \n")
    assert run("source_hash.py", two / "myservice").stdout != first.stdout
    (one / "myservice" / "handlers.py").rename(one / "myservice" / "other.py")
    assert run("source_hash.py", one / "myservice").stdout != first.stdout


def test_the_handler_check_finds_what_the_module_defines_without_importing_it(
    tmp_path: Path,
) -> None:
    """A handler defined, assigned or imported passes, though its module imports what the
    controller lacks; a missing module or name fails naming app_handler."""
    root = sources(tmp_path, "import nosuchdependency\nfrom x import y as other\n"
                   "async def main(ws):\n    pass\nalias = main\n")  # fmt: skip
    for spec in ("myservice.handlers:main", "myservice.handlers:alias",
                 "myservice.handlers:other"):  # fmt: skip
        result = run("check_handler.py", spec, root)
        assert result.returncode == 0, (spec, result.stderr)
    missing = run("check_handler.py", "myservice.handlers:nosuch", root)
    assert missing.returncode == 1
    assert "app_handler 'myservice.handlers:nosuch': myservice.handlers defines no 'nosuch'" in (
        missing.stderr
    )
    nomodule = run("check_handler.py", "myservice.nosuch:main", root)
    assert nomodule.returncode == 1
    assert "no module 'myservice.nosuch'" in nomodule.stderr
    # Only inside a wheel of app_extra_packages: left to the release's start.
    assert run("check_handler.py", "wheeled.mod:main", root, tmp_path / "w.whl").returncode == 0
