"""Both the editable install and a built wheel carry the built-in plugins and their entry points."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points

from conftest import REPO

MODULES = ["stx_builtin/readers/lamost.py", "stx_builtin/readers/desi.py", "stx_builtin/readers/fits1d.py",
           "stx_builtin/featurizers/raw.py"]


def _declared() -> dict[str, str]:
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["entry-points"]["stx"]


def test_editable_install_exposes_every_declared_builtin():
    installed = {ep.name: ep.value for ep in entry_points(group="stx") if ep.dist.metadata["Name"] == "stx"}
    assert installed == _declared()


def test_every_declared_module_exists():
    for name, module in _declared().items():
        path = REPO / "plugins" / (module.replace(".", "/") + ".py")
        assert path.exists(), f"entry point {name} names a missing module {module}"


def test_wheel_contains_builtins(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("stx-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        eps = next(n for n in names if n.endswith("entry_points.txt"))
        text = z.read(eps).decode()
    for m in MODULES:
        assert m in names, f"{m} missing from the wheel"
    for module in _declared().values():
        assert module.replace(".", "/") + ".py" in names
    assert "[stx]" in text and "reader-lamost = stx_builtin.readers.lamost" in text
    assert not any(n.startswith("tests/") for n in names)
