"""Backend URLs: what SMoAConfig accepts, which backend a scheme picks, passwords kept out of messages."""

from __future__ import annotations

import pytest

from smoa import SMoAConfig
from smoa.errors import ConfigError, StorageError
from smoa.storage.base import open_catalog_backend, open_weight_backend, url_scheme
from smoa.storage.postgres import PostgresCatalog, normalise_url, redact


def test_config_keeps_urls_and_checks_weights_path(tmp_path) -> None:
    cfg = SMoAConfig(storage_path="postgresql://u@h:5432/db", weights_path="s3://bucket/prefix")
    assert cfg.storage_path == "postgresql://u@h:5432/db" and cfg.weights_path == "s3://bucket/prefix"
    for bad in ("/a/local/dir", "", 3):
        with pytest.raises(ConfigError, match="`weights_path`"):
            SMoAConfig(storage_path=tmp_path, weights_path=bad)
    with pytest.raises(ConfigError, match="persistent `storage_path`"):
        SMoAConfig(weights_path="s3://bucket/prefix")


def test_scheme_dispatch() -> None:
    assert url_scheme("postgresql://u@h/db") == "postgresql" and url_scheme("/data/lib") is None
    with pytest.raises(ConfigError, match="`storage_path`.*no storage backend"):
        open_catalog_backend("mysql://u@h/db", None)
    with pytest.raises(ConfigError, match="`weights_path`.*no storage backend"):
        open_weight_backend("gs://bucket/x", None)
    with pytest.raises(ConfigError, match="`weights_path`"):
        open_weight_backend("s3://Not_A_Bucket/x", None)


def test_postgres_urls_and_unreachable_server() -> None:
    assert normalise_url("postgres://u@h/db") == normalise_url("postgresql+psycopg://u@h/db") == "postgresql://u@h/db"
    assert redact("postgresql://u:s3cret@h:5/db") == "postgresql://u:***@h:5/db"
    with pytest.raises(StorageError) as info:
        PostgresCatalog("postgresql://u:s3cret@127.0.0.1:9/db", listen=False, reconnect_timeout_s=0.5)  # nothing listens on port 9
    assert "cannot connect" in str(info.value) and "s3cret" not in str(info.value)
