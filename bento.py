"""Bentos of released models, and each BentoML service of a bento served on its own.

    python -m bento build --package DIR --version 7 --out FILE.bento     # prints the archive's path
    python -m bento serve api --model-url http://127.0.0.1:3001 [--port 3000]
    python -m bento serve model [--port 3001]
    python -m bento serve all [--port 3000]                             # both, as `make serve` does
    python -m bento health [--port 3000]                                # exit 0 when /readyz answers 200

`build` puts a model package into BentoML's model store as `NAME:vN` (its files checked
against the checksums its config records, the registry version in the model's metadata)
and builds the bento `captioning:vN` around it, whose service then loads `bento:NAME:vN`:
no registry, no network. The container image runs `serve` from inside that bento.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

from captioning.config import PROJECT_ROOT, disable_telemetry

disable_telemetry()

BENTO_NAME = "captioning"
SERVICE = "service:CaptionAPI"
MODEL_SERVICE = "caption_model"
# What a bento carries besides the model: the service, the parts of the library serving calls
# (not training, evaluation, release or the CLI), the web page.
LIBRARY = [
    *(f"captioning/{name}.py" for name in ("__init__", "settings", "config", "vocab", "images", "pyfunc")),
    *(f"captioning/{package}/*.py" for package in ("data", "features", "models", "inference", "registry", "serving")),
]
INCLUDE = ["service.py", "bento.py", *LIBRARY, "web/index.html", "web/app.js", "web/style.css"]


def tag_version(version: str) -> str:
    """BentoML tag version of a registry version: "7" -> "v7"."""
    return version if version.startswith("v") else f"v{version}"


def build(package: Path, version: str, out: Path, name: str = "captioner") -> Path:
    """The bento `captioning:vN` holding the package as model `name:vN`, exported with its
    model to the archive `out` (what `bentoml import` takes and the image is built from)."""
    import bentoml
    from bentoml.exceptions import NotFound

    from captioning.inference.model_package import check_package_files

    checksums = check_package_files(package)
    tag = f"{name}:{tag_version(version)}"
    try:
        bentoml.models.delete(tag)  # a release is rebuilt from the registry, never half-kept
    except NotFound:
        pass
    metadata = {"registry_version": str(version), "model_name": name, "sha256": checksums}
    with bentoml.models.create(name=tag, labels={"project": BENTO_NAME}, metadata=metadata) as model:
        for item in package.iterdir():
            if item.is_file():
                shutil.copy2(item, Path(model.path) / item.name)
    bento_tag = f"{BENTO_NAME}:{tag_version(version)}"
    try:
        bentoml.bentos.delete(bento_tag)
    except NotFound:
        pass
    with tempfile.TemporaryDirectory(prefix="bento-context-") as context:
        copy_sources(Path(context))
        bento = bentoml.bentos.build(
            SERVICE,
            name=BENTO_NAME,
            version=tag_version(version),
            include=INCLUDE,
            models=[tag],
            labels={"project": BENTO_NAME, "registry_version": str(version)},
            build_ctx=context,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(bento.export(str(out)))


def copy_sources(context: Path) -> None:
    """The files a bento carries, alone in a build context: BentoML walks the whole context, and
    the project's own folder also holds data, artifacts and BentoML's store."""
    for pattern in INCLUDE:
        for path in PROJECT_ROOT.glob(pattern):
            if path.is_file() and "__pycache__" not in path.parts:
                target = context / path.relative_to(PROJECT_ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def bento_model(folder: Path) -> str:
    """`bento:NAME:VERSION` of the model a bento folder carries."""
    import yaml

    models = yaml.safe_load((folder / "bento.yaml").read_text(encoding="utf-8")).get("models") or []
    if not models:
        sys.exit(f"error: the bento {folder} carries no model")
    return f"bento:{models[0]['tag']}"


def serve(part: str, port: int, host: str, model_url: str | None, bento: str) -> None:
    """Serve the API, the model service, or both, from a bento folder or the source tree."""
    from _bentoml_impl.server import serve_http
    from bentoml._internal.log import configure_server_logging
    from bentoml._internal.service.loader import load

    if part == "api" and not model_url:
        sys.exit("error: serve api needs --model-url (where the model service answers)")
    configure_server_logging()
    working_dir = str(Path(bento).resolve())
    if bento != ".":
        os.environ.setdefault("CAPTIONING_MODEL", bento_model(Path(working_dir)))
    target = working_dir if bento != "." else SERVICE
    if sys.path[0] != working_dir:
        sys.path.insert(0, working_dir)
    load(bento_identifier=target, working_dir=working_dir).inject_config()
    options = dict(working_dir=working_dir, host=host, port=port)
    if part == "model":
        serve_http(target, service_name=MODEL_SERVICE, **options)
    elif part == "api":
        serve_http(target, dependency_map={MODEL_SERVICE: model_url}, **options)
    else:
        serve_http(target, **options)


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return 0 if answer.status == 200 else 1
    except OSError:
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bento", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    built = commands.add_parser("build", help="a bento holding one model package")
    built.add_argument("--package", required=True, type=Path)
    built.add_argument("--version", required=True, help="the registry version the package is")
    built.add_argument("--out", required=True, type=Path, help="the archive to write (.bento)")
    built.add_argument("--name", default="captioner", help="the model's name in the store")
    served = commands.add_parser("serve", help="serve one part of the service")
    served.add_argument("part", choices=["api", "model", "all"])
    served.add_argument("--port", type=int, default=int(os.environ.get("CAPTIONING_PORT", "3000")))
    served.add_argument("--host", default=os.environ.get("CAPTIONING_HOST", "0.0.0.0"))
    served.add_argument("--model-url", default=os.environ.get("CAPTIONING_MODEL_URL"))
    served.add_argument(
        "--bento", default=os.environ.get("CAPTIONING_BENTO", "."), help="a bento folder (default: the source tree)"
    )
    checked = commands.add_parser("health", help="exit 0 when the server's /readyz answers 200")
    checked.add_argument("--port", type=int, default=int(os.environ.get("CAPTIONING_PORT", "3000")))
    args = parser.parse_args(argv)
    if args.command == "build":
        if not args.version.removeprefix("v").isdigit():
            parser.error(f"--version must be a registry version number, not {args.version!r}")
        print(build(args.package.resolve(), args.version.removeprefix("v"), args.out.resolve(), args.name))
        return 0
    if args.command == "health":
        return health(args.port)
    serve(args.part, args.port, args.host, args.model_url, args.bento)
    return 0


if __name__ == "__main__":
    sys.exit(main())
