"""One object that ties a home, a config and a store together; the CLI and library users start here."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from kvdb.config import Config, Home, load_config
from kvdb.store.db import Store, open_store


@dataclass
class Runtime:
    home: Home
    config: Config

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, config: str | os.PathLike | None = None) -> "Runtime":
        return cls(Home.resolve(home), load_config(config))

    @property
    def database_url(self) -> str:
        return self.home.database_url(self.config)

    @functools.cached_property
    def store(self) -> Store:
        """The store, created and migrated on first use; refused if it is at another schema revision."""
        return open_store(self.database_url, busy_timeout_ms=self.config.store.busy_timeout_ms)

    def unmigrated_store(self) -> Store:
        """The store without the revision check, for `kvdb db` commands that inspect or fix the schema."""
        return Store(self.database_url, busy_timeout_ms=self.config.store.busy_timeout_ms)
