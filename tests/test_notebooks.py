"""Every notebook under notebooks/ runs top to bottom (nbclient) and is committed without outputs.

MIXTRAL_NOTEBOOK_QUICK=1 makes the notebooks that train run fewer steps: every cell still runs, on the same
models, while the committed notebooks keep step counts whose curves mean something to a reader."""
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# The fast suite runs the notebook of the README's main path (load -> fine-tune -> generate); the tour
# and the routing lab run with -m slow.
FAST = {"03_finetune_and_generate.ipynb"}


@pytest.mark.parametrize("path", [p if p.name in FAST else pytest.param(p, marks=pytest.mark.slow)
                                  for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
  monkeypatch.setenv("MIXTRAL_NOTEBOOK_QUICK", "1")  # the kernel inherits this process's environment
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}}).execute()
