"""captioning.serving is importable without BentoML, torch or MLflow: the API's checks load fast
and run in tests without a server."""

from __future__ import annotations

import subprocess
import sys

from captioning.config import PROJECT_ROOT


def test_serving_modules_import_neither_bentoml_nor_torch_nor_mlflow():
    code = (
        "import importlib, pkgutil, sys\n"
        "import captioning.serving as serving\n"
        "names = [info.name for info in pkgutil.iter_modules(serving.__path__, 'captioning.serving.')]\n"
        "assert len(names) >= 8, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "loaded = {m.split('.')[0] for m in sys.modules} & {'bentoml', 'torch', 'mlflow'}\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=120)
