"""The documentation keeps up with the code: every hook is documented."""

from __future__ import annotations

import inspect

from stxcli import hookspecs

from conftest import REPO


def test_every_hook_is_documented():
    text = (REPO / "docs" / "plugins.md").read_text()
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "stx_spec")]
    assert len(hooks) >= 5
    for name in hooks:
        assert f"### {name}" in text, f"hook {name} has no section in docs/plugins.md"


def test_minimal_plugin_example_works(tmp_path, monkeypatch, fresh_registry):
    """The complete minimal plugin in docs/plugins.md registers and reads its format."""
    import re
    import sys

    import numpy as np

    from stxcli import plugins as P
    from stxcli import registry as R

    text = (REPO / "docs" / "plugins.md").read_text()
    code = re.search(r"`stx_hello.py`.*?```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "stx_hello.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import stx_hello

    info = P.PluginInfo(name="hello", module="stx_hello", distribution="stx-hello", version="0.1.0")
    reg = R.Registry(P.load_plugins(extra=[(info, stx_hello)]))
    assert reg.items["reader"]["hello"].plugin.distribution == "stx-hello"
    spec = tmp_path / "star.hello"
    np.savetxt(spec, np.c_[np.linspace(4000, 5000, 50), np.ones(50)])
    reader = R.identify(spec, reg)
    assert reader.name == "hello"
    (batch,) = list(reader.read(spec))
    batch.validate()
    assert batch.n == 1 and batch.meta.ids[0] == "star"
    sys.modules.pop("stx_hello", None)


def test_docs_build_strict(tmp_path):
    """The documentation builds with mkdocs in strict mode (broken links and nav entries fail)."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("mkdocs")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "site" / "index.html").exists()
