"""Hot reload of a daemon's config file: parse, validate, diff, apply what may change.

One reload (on SIGHUP, a change of the file, or Admin.Reload):
1. read and validate the whole file with the daemon's own loader; any error
   (unreadable, bad YAML, unknown or invalid setting) refuses the reload: the
   config in force stays, the error is kept for `Admin.GetStatus` and logged;
2. diff it against the config in force, field by field, under dotted names
   (`routing.prefill_length_threshold`);
3. changed fields under a reloadable name (`RELOADABLE_WORKER_FIELDS`) are copied
   into the config in force with `dataclasses.replace`, and the new config is
   handed to `apply` in one call (the daemon swaps it in at once);
4. the other changed fields are logged as needing a restart and not applied;
   every later reload reports them again until the daemon restarts or the file
   goes back.

Reloads run on the daemon's event loop, one at a time, so a request sees either
the old config or the new one, never a mix.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from splitserve.config.daemon import config_hash
from splitserve.errors import ConfigError

log = logging.getLogger(__name__)

C = TypeVar("C")


@dataclass(frozen=True)
class ReloadResult:
    """What one reload did. `config_hash` identifies the file whose reloadable part is
    in force after it (unchanged when the reload was refused)."""

    trigger: str  # "SIGHUP", "file change", "Admin.Reload"
    applied_fields: tuple[str, ...] = ()
    restart_fields: tuple[str, ...] = ()  # changed, not applied: need a restart
    error: str = ""  # why the file was refused; "" when it was read
    config_hash: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def status_note(self) -> str:
        """`GetStatus.config_reload_error` after this reload: the refusal, or the
        changed fields that are not in force until a restart; "" when all applied."""
        if self.error:
            return self.error
        if self.restart_fields:
            return "needs a restart to apply: " + ", ".join(self.restart_fields)
        return ""


def diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaf fields that differ between two configs of one type."""
    names = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a) and type(a) is type(b):
            names += diff_fields(a, b, f"{prefix}{f.name}.")
        elif a != b:
            names.append(f"{prefix}{f.name}")
    return names


def is_reloadable(name: str, reloadable: Iterable[str]) -> bool:
    """`name` is a reloadable field or lies under one (`routing` covers `routing.*`)."""
    return any(name == r or name.startswith(f"{r}.") for r in reloadable)


def with_fields(base: C, source: C, names: Iterable[str]) -> C:
    """`base` with the dotted fields `names` taken from `source` (nested replace)."""
    for name in names:
        parts = name.split(".")
        base = _replace_path(base, parts, _get_path(source, parts))
    return base


def _get_path(obj: Any, parts: list[str]) -> Any:
    for part in parts:
        obj = getattr(obj, part)
    return obj


def _replace_path(obj: Any, parts: list[str], value: Any) -> Any:
    head, *rest = parts
    if rest:
        value = _replace_path(getattr(obj, head), rest, value)
    return dataclasses.replace(obj, **{head: value})


class ConfigReloader(Generic[C]):
    """Reloads `path` into `config` (the config in force). See the module docstring.

    `load(path)` must return a validated config or raise; `apply(new)` makes the
    new config current in the daemon and runs only when some field applied.
    """

    def __init__(self, path: str | Path, load: Callable[[Path], C], config: C, *,
                 reloadable: Iterable[str], apply: Callable[[C], None] | None = None,
                 config_hash_value: str | None = None) -> None:
        self.path = Path(path)
        self.config = config
        self.config_hash = (config_hash(self.path) if config_hash_value is None
                            else config_hash_value)
        self.reloadable = frozenset(reloadable)
        self.last: ReloadResult | None = None
        self._load = load
        self._apply = apply

    @property
    def status_note(self) -> str:
        """What `GetStatus.config_reload_error` shows: see `ReloadResult.status_note`."""
        return self.last.status_note() if self.last is not None else ""

    def reload(self, trigger: str) -> ReloadResult:
        """Never raises: a refused file is the result's `error`, the old config stays."""
        try:
            # Hashed before the parse: a save racing with this read changes the file
            # again, so the watcher reloads once more and the hash catches up.
            new_hash = config_hash(self.path)
            loaded = self._load(self.path)
        except ConfigError as exc:
            return self._refuse(trigger, str(exc))
        except Exception as exc:  # a reload must never take the daemon down
            log.warning("config %s: unexpected %s while loading", self.path,
                        type(exc).__name__, exc_info=exc)
            return self._refuse(trigger, f"{self.path}: {type(exc).__name__}: {exc}")
        changed = diff_fields(self.config, loaded)
        applied = tuple(n for n in changed if is_reloadable(n, self.reloadable))
        restart = tuple(n for n in changed if n not in applied)
        if applied:
            new = with_fields(self.config, loaded, applied)
            try:
                if self._apply is not None:
                    self._apply(new)
            except Exception as exc:  # same: keep serving on the old config
                log.error("config %s: applying %s failed", self.path, ", ".join(applied),
                          exc_info=exc)
                return self._refuse(trigger, f"applying {', '.join(applied)} failed: "
                                    f"{type(exc).__name__}: {exc}")
            self._log_applied(trigger, loaded, applied)
            self.config = new
        elif not restart:
            log.info("config %s reloaded (%s): no changes", self.path, trigger)
        if restart:
            log.warning("config %s (%s): %s changed but needs a restart; not applied",
                        self.path, trigger, ", ".join(restart))
        self.config_hash = new_hash
        self.last = ReloadResult(trigger, applied, restart, "", new_hash)
        return self.last

    def _refuse(self, trigger: str, error: str) -> ReloadResult:
        error = " ".join(error.split())  # one line for GetStatus (YAML errors span several)
        log.error("config %s: reload (%s) refused, keeping the config in force: %s",
                  self.path, trigger, error)
        self.last = ReloadResult(trigger, error=error, config_hash=self.config_hash)
        return self.last

    def _log_applied(self, trigger: str, loaded: C, applied: tuple[str, ...]) -> None:
        changes = ", ".join(f"{n}={_get_path(loaded, n.split('.'))!r} "
                            f"(was {_get_path(self.config, n.split('.'))!r})" for n in applied)
        log.info("config %s reloaded (%s): applied %s", self.path, trigger, changes)
