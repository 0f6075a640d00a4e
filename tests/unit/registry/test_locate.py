"""A model reference becomes a registry version and a package folder: models:/ URIs, folders, and
the tracking URI they are read from (a real MLflow sqlite store where one is needed)."""

from __future__ import annotations

import json

import pytest
import yaml

from captioning.config import PARAMS_FILE, PROJECT_ROOT, artifacts_dir
from captioning.registry.locate import Located, locate, parse_models_uri
from captioning.registry.store import RegistryError, mlflow_client, tracking_uri
from captioning.settings import load_settings

NOT_A_MODELS_URI = "is not a models:/NAME@ALIAS or models:/NAME/N URI"


def package(folder):
    """A folder that passes for a model package: the locator looks for its config.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"decoder": "attention"}), encoding="utf-8")
    return folder


def test_models_uris_name_an_alias_or_a_version():
    assert parse_models_uri("models:/captioner@champion") == ("captioner", "champion", None)
    assert parse_models_uri("models:/captioner/3") == ("captioner", None, "3")
    assert parse_models_uri("models:/captioner/12/") == ("captioner", None, "12")


@pytest.mark.parametrize(
    "text",
    ["models:/captioner", "models:/captioner/latest", "models:/a/b/3", "models:/captioner@", "models:captioner/1"],
)
def test_other_models_uris_are_refused_by_name(text, monkeypatch):
    with pytest.raises(RegistryError, match=f"^{text!r} {NOT_A_MODELS_URI}$"):
        parse_models_uri(text)
    # locate() says the same, before it looks for a tracking URI (none is set here).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RegistryError, match=NOT_A_MODELS_URI):
        locate(text)


def test_a_package_folder_is_located_as_it_is(tmp_path):
    folder = package(tmp_path / "model")
    assert locate(folder) == Located(None, folder.resolve())
    assert locate(str(folder)) == Located(None, folder.resolve())


def test_the_package_inside_an_mlflow_model_folder_is_found_through_its_mlmodel(tmp_path):
    model = tmp_path / "downloaded"
    package(model / "artifacts" / "package")
    spec = {"flavors": {"python_function": {"data": "artifacts/package", "loader_module": "captioning.registry"}}}
    (model / "MLmodel").write_text(yaml.safe_dump(spec), encoding="utf-8")
    assert locate(model) == Located(None, (model / "artifacts" / "package").resolve())


def test_bad_folders_are_refused_with_the_reason(tmp_path):
    with pytest.raises(RegistryError, match="absent: no such model package folder"):
        locate(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="holds no captioning package"):
        locate(tmp_path / "empty")
    model = tmp_path / "other"
    model.mkdir()
    (model / "MLmodel").write_text(yaml.safe_dump({"flavors": {"sklearn": {}}}), encoding="utf-8")
    with pytest.raises(RegistryError, match="holds no captioning package"):
        locate(model)


def test_an_alias_is_read_from_the_store_and_names_where_the_version_goes(store, tmp_path):
    client = mlflow_client(store)
    client.create_registered_model("captioner")
    for _ in range(2):
        client.create_model_version("captioner", source=str(tmp_path / "model"))
    client.set_registered_model_alias("captioner", "champion", "2")
    located = locate("models:/captioner@champion", store, download=False)
    assert located.version == "2" and located.path.parent == artifacts_dir() / "registry" / "captioner"
    assert located.path.name.startswith("2-")
    assert not located.path.exists()  # nothing was downloaded
    assert locate("models:/captioner/2", store, download=False) == located
    assert locate("models:/captioner/1", store, download=False).version == "1"
    with pytest.raises(RegistryError, match="model 'captioner' has no version 7"):
        locate("models:/captioner/7", store, download=False)


def test_the_same_version_number_of_a_reset_registry_goes_to_another_folder(tmp_path):
    """After a registry is reset, version 1 may be another model: it must not be read from the
    download of the old version 1."""
    folders = []
    for registry in ("first", "reset"):
        uri = f"sqlite:///{tmp_path / registry}.db"
        client = mlflow_client(uri)
        client.create_registered_model("captioner")
        client.create_model_version("captioner", source=str(tmp_path / registry / "model"))
        folders.append(locate("models:/captioner/1", uri, download=False).path)
    assert folders[0] != folders[1] and folders[0].name.startswith("1-") and folders[1].name.startswith("1-")


def test_a_missing_alias_or_model_is_named(store, monkeypatch):
    mlflow_client(store).create_registered_model("captioner")
    with pytest.raises(RegistryError, match="models:/captioner@champion: model 'captioner' has no alias 'champion'"):
        locate("models:/captioner@champion", store, download=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # the store when none is passed
    with pytest.raises(RegistryError, match="model 'unknown' has no alias 'champion'"):
        locate("models:/unknown@champion", download=False)


def test_a_registry_reference_needs_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RegistryError, match="no MLflow tracking URI"):
        locate("models:/captioner@champion", download=False)


def test_the_tracking_uri_is_the_one_passed_then_the_environment_then_the_settings(monkeypatch, tmp_path):
    settings = load_settings(PARAMS_FILE, None, [f"tracking.uri=sqlite:///{tmp_path}/settings.db"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(settings, "http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert tracking_uri(settings) == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(settings) == f"sqlite:///{tmp_path}/settings.db"
    with pytest.raises(RegistryError, match="no MLflow tracking URI"):
        tracking_uri(None)


def test_a_relative_sqlite_path_is_taken_from_the_project_root(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, "sqlite:///mlflow.db") == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    assert tracking_uri(None, "sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
