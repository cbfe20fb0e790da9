"""Recipes, shadow bundle, promote and rollback of one line (the control socket's operations).

A line's recipes are its own bundle + threshold (recipe `default`) and the named `recipes:` of
its config. Every change goes through `LineRecipes` (one operation at a time per line): the new
engine is loaded, parity-gated and warmed FIRST, off the line's worker; only a ready engine is
swapped in (`LinePipeline.activate`, one assignment the worker reads once per frame); anything
else is refused with the reason. Each change is appended to the audit log and persisted.

Persistence (a restart keeps the outcome): `<state_dir>/<line>/recipes.json`, written atomically:

    {"active": "<recipe>",                                   the recipe active at start
     "overrides": {"<recipe>": {"bundle": ..., "threshold": ...}},   promoted bundle/threshold
     "previous":  {"<recipe>": {"bundle": ..., "threshold": ...}},   what `rollback` restores
     "shadow": {"bundle": ..., "threshold": ...} | null}     set through the socket (absent: config's)

The daemon honours it when it builds the line; the YAML config is never rewritten by the daemon
(it may not be writable by the service user; `inspectd calibrate` still edits it). A recipe the
state names but the config no longer has is ignored (logged).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from inspectd.daemon.audit import local_who
from inspectd.daemon.config import DEFAULT_RECIPE, LineConfig, ThresholdFile
from inspectd.daemon.line import LineThreshold
from inspectd.daemon.pipeline import ActiveRecipe, LinePipeline, RecipeNotReady
from inspectd.errors import ConfigError, InspectdError
from inspectd.fileio import atomic_write

log = logging.getLogger("inspectd.recipes")

STATE_FILE = "recipes.json"


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
    name: str
    bundle: Path
    threshold: float | Path          # a number or a calibration file
    roi: tuple[int, int, int, int] | None
    preload: bool = False

    def describe(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "threshold": threshold_json(self.threshold)}


def threshold_json(spec: float | Path) -> float | str:
    """A recipe threshold (a number or a calibration file) as the state file and answers write it."""
    return spec if isinstance(spec, float) else str(spec)


def _spec_threshold(value: Any) -> float | Path:
    if isinstance(value, ThresholdFile):
        return value.file
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return Path(value)


def _from_state(name: str, entry: dict[str, Any], roi: Any) -> RecipeSpec:
    return RecipeSpec(name, Path(entry["bundle"]), _spec_threshold(entry["threshold"]), roi)


def config_specs(cfg: LineConfig) -> dict[str, RecipeSpec]:
    specs = {DEFAULT_RECIPE: RecipeSpec(DEFAULT_RECIPE, cfg.bundle, _spec_threshold(cfg.threshold),
                                        tuple(cfg.roi) if cfg.roi else None)}
    for r in cfg.recipes:
        specs[r.name] = RecipeSpec(r.name, r.bundle, _spec_threshold(r.threshold),
                                   tuple(r.roi) if r.roi else None, r.preload)
    return specs


def promoted_over_config(cfg: LineConfig, state_dir: Path) -> RecipeSpec | None:
    """The line's own recipe as a promote persisted it (recipes.json), when that is not the
    config's bundle and threshold: then the config's threshold judges none of its parts (until a
    rollback). None when the config's own recipe stands. A state file that exists but cannot be
    read is an error here (the caller, calibrate, may lack the daemon's rights to read it: it
    cannot tell whether the file it would write judges anything)."""
    path = state_path(state_dir, cfg.id)
    try:
        state = _load_state(path)
    except NotADirectoryError:  # no state saved (the state folder's own fault is reported where it is written)
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc}): cannot tell "
                          f"whether a promote replaced line {cfg.id}'s bundle") from None
    overrides = state.get("overrides")
    entry = overrides.get(DEFAULT_RECIPE) if isinstance(overrides, dict) else None
    base = config_specs(cfg)[DEFAULT_RECIPE]
    try:
        spec = _from_state(DEFAULT_RECIPE, entry, base.roi)
    except (KeyError, TypeError):
        return None
    return None if (spec.bundle, spec.threshold) == (base.bundle, base.threshold) else spec


def _warm(recipe: Any) -> bool:
    """A recipe engine a switch can use as it is: opened, and not failed or closed since (a worker's
    fail-over closes the engine it gives up, also one parked meanwhile)."""
    return isinstance(recipe, ActiveRecipe) and recipe.runner is not None and recipe.runner.usable


def state_path(state_dir: Path, line: str) -> Path:
    return Path(state_dir) / line / STATE_FILE


def _load_state(path: Path) -> dict[str, Any]:
    """A line's saved state ({} when there is none); OSError / ValueError when it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def read_state(state_dir: Path, line: str) -> dict[str, Any]:
    path = state_path(state_dir, line)
    try:
        return _load_state(path)
    except (OSError, ValueError) as exc:
        log.error("line %s: %s unreadable, using the config's recipe (%s)", line, path, exc)
        return {}


class LineRecipes:
    """The recipe operations of one running line. `audit(line, what, old, new, who, reason)` records
    a change (and returns its generation)."""

    def __init__(self, cfg: LineConfig, state_dir: Path, audit: Any) -> None:
        self.cfg = cfg
        self.line = cfg.id
        self.state_dir = Path(state_dir)
        self.audit = audit
        self._pipeline: LinePipeline | None = None  # attach()
        self.publisher: Any = None
        self.metrics: Any = None
        # One change at a time: switch / shadow / promote / rollback and the SIGHUP reload (run.py
        # holds it through a line's whole reload, so a reload never lands inside a switch and the
        # recipe switched in is the one that re-reads its calibration). Re-entrant: reload_waiting.
        self.lock = threading.RLock()
        self.state = read_state(self.state_dir, self.line)
        self.specs = config_specs(cfg)
        for name, entry in dict(self.state.get("overrides") or {}).items():
            if name in self.specs:
                self.specs[name] = dataclasses.replace(_from_state(name, entry, self.specs[name].roi),
                                                       preload=self.specs[name].preload)
            else:
                log.warning("line %s: state names recipe %s, which the config no longer has: ignored",
                            self.line, name)
        active = self.state.get("active", cfg.recipe)
        if active not in self.specs:
            log.warning("line %s: state says recipe %s, which the config no longer has: using %s",
                        self.line, active, cfg.recipe)
            active = cfg.recipe
        self.initial = self.specs[active]
        self.standby: dict[str, ActiveRecipe | str] = {}   # preloaded engines (or why they are not ready)
        self.previous: dict[str, ActiveRecipe] = {}        # kept warm for rollback after a promote
        self.shadow: Any = None
        self.shadow_spec: RecipeSpec | None = None

    def fall_back_to_config(self, exc: Exception) -> bool:
        """The recipe active at start came from recipes.json (a persisted switch or promote) and it
        cannot be opened (`exc`: its bundle cleaned up, or a share not mounted yet). Judge with the
        config's own recipe for this run, and say so (log, audit); recipes.json is left as it is, so a
        later start goes back to it once the cause is gone. False if the config's recipe is what failed
        (then the config is wrong: the start is refused)."""
        base = config_specs(self.cfg)[self.cfg.recipe]
        lost = self.initial
        if (lost.name, lost.bundle, lost.threshold) == (base.name, base.bundle, base.threshold):
            return False
        log.error("line %s: recipe %s as persisted in %s (bundle %s, threshold %s) cannot be used: %s; judging "
                  "with the config's recipe %s (bundle %s) for this run; %s is kept for the next start",
                  self.line, lost.name, state_path(self.state_dir, self.line), lost.bundle,
                  threshold_json(lost.threshold), exc, base.name, base.bundle, STATE_FILE)
        self.initial = self.specs[base.name] = base
        self.audit(self.line, "recipe", dict(lost.describe(), recipe=lost.name),
                   dict(base.describe(), recipe=base.name), local_who("start"),
                   f"persisted recipe unusable at start: {exc}")
        return True

    # ---- start -----------------------------------------------------------------------------------

    @property
    def pipeline(self) -> LinePipeline:
        """The line's pipeline: attach() gives it before the daemon runs any recipe operation."""
        if self._pipeline is None:
            raise RuntimeError(f"line {self.line}: a recipe operation before the line was attached")
        return self._pipeline

    def attach(self, pipeline: LinePipeline, publisher: Any, metrics: Any) -> None:
        self._pipeline, self.publisher, self.metrics = pipeline, publisher, metrics
        if metrics is not None:
            metrics.set_recipe(self.line, self.initial.name)

    def start_background(self) -> None:
        """Preloaded recipes and the shadow bundle open after the line's own engine (own thread)."""
        threading.Thread(target=self._start, name=f"recipes-{self.line}", daemon=True).start()

    def _start(self) -> None:
        self.pipeline.engine_resolved.wait()
        for spec in list(self.specs.values()):
            if spec.preload and spec.name != self.pipeline.recipe:
                # Opened without the lock (seconds: switches and SIGHUP must not wait), parked with it.
                try:
                    opened: ActiveRecipe | str = self._open(spec)
                except (RecipeNotReady, InspectdError) as exc:
                    opened = str(exc)
                    log.error("line %s: preload of recipe %s failed: %s", self.line, spec.name, exc)
                self._park_preload(spec.name, opened)
        shadow = self.state.get("shadow", "config")
        spec = None
        if shadow == "config" and self.cfg.shadow is not None:
            spec = RecipeSpec("shadow", self.cfg.shadow.bundle, _spec_threshold(self.cfg.shadow.threshold),
                              self.initial.roi)
        elif isinstance(shadow, dict):
            spec = _from_state("shadow", shadow, self.initial.roi)
        if spec is None:
            return
        try:  # opened without the lock, like the preloads
            recipe = self._open_shadow(spec)
        except (RecipeNotReady, InspectdError) as exc:
            log.error("line %s: shadow bundle not started: %s", self.line, exc)
            return
        with self.lock:  # an operator's shadow set or cleared meanwhile wins over the one start-up opened
            if self.shadow is None and self.state.get("shadow", "config") == shadow:
                self._install_shadow(spec, recipe)
            else:
                self.pipeline.retire(recipe)

    def _park_preload(self, name: str, opened: ActiveRecipe | str) -> None:
        """A preload's outcome into standby, unless a switch got there first (then its engine is
        closed). Its threshold is read again: a SIGHUP during the open could not reach it."""
        with self.lock:
            taken = name == self.pipeline.recipe or isinstance(self.standby.get(name), ActiveRecipe)
            if taken:
                if isinstance(opened, ActiveRecipe):
                    self.pipeline.retire(opened)
                return
            self.standby[name] = opened
            if isinstance(opened, ActiveRecipe):
                self._reload_recorded(opened, self.specs[name].threshold, local_who("start"),
                                      "changed while its preloaded engine opened")
                log.info("line %s: recipe %s ready in standby (threshold %.4g)", self.line, name,
                         opened.threshold.value)

    # ---- helpers ---------------------------------------------------------------------------------

    def _open(self, spec: RecipeSpec, backends: tuple[str, ...] | None = None, settings: Any = None,
              check_budget: bool = True) -> ActiveRecipe:
        from inspectd.engines.bundle import check_line_roi, load_bundle

        try:
            bundle = load_bundle(spec.bundle)
            check_line_roi(spec.roi, bundle.roi, f"recipe {spec.name} roi", bundle.path)
            threshold = LineThreshold.from_config(self.line, spec.threshold, bundle.bundle_id)
        except (InspectdError, OSError) as exc:
            raise RecipeNotReady(f"recipe {spec.name!r}: {exc}") from None
        return self.pipeline.open_recipe_engine(spec.name, bundle, threshold, spec.roi,
                                                backends=backends, settings=settings, check_budget=check_budget)

    def _save_state(self, state: dict[str, Any]) -> None:
        """Persist `state` (then it is self.state). Every operation saves BEFORE it changes the line:
        a change the next start would undo (full disk, read-only state_dir) is refused instead, and
        nothing changes (RecipeNotReady, so the requester's answer and the line always agree)."""
        path = state_path(self.state_dir, self.line)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, (json.dumps(state, indent=2, default=str) + "\n").encode(), mode=0o644)
        except OSError as exc:
            raise RecipeNotReady(f"line {self.line}: cannot record the change in {path} "
                                 f"({exc.strerror or exc}); nothing changed") from None
        self.state = state

    def _save_or_drop(self, state: dict[str, Any], opened: ActiveRecipe | None, deadline: float | None = None) -> None:
        """The commit point of every change: _save_state, unless the requester has stopped waiting
        for the answer (`deadline`, monotonic: it was told 'no answer', so nothing may change). If
        either refuses, the engine opened for the change is closed again."""
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise RecipeNotReady(f"line {self.line}: the change took longer than its requester waits for "
                                     f"the answer; nothing changed (ask again)")
            self._save_state(state)
        except RecipeNotReady:
            if opened is not None:
                self.pipeline.retire(opened)
            raise

    def _record(self, what: str, old: Any, new: Any, who: dict[str, Any], reason: str | None) -> int:
        return self.audit(self.line, what, old, new, who, reason)

    def _reload_recorded(self, r: ActiveRecipe, spec: float | Path | None, who: dict[str, Any], reason: str) -> None:
        """Re-read a waiting engine's threshold (`spec`: LineThreshold.reload's); a change is audited."""
        before = self._desc(r)
        r.threshold.reload(spec)
        after = self._desc(r)
        if (after["threshold"], after["threshold_file"]) != (before["threshold"], before["threshold_file"]):
            self._record("threshold", before, after, who, reason)

    @staticmethod
    def _desc(r: ActiveRecipe) -> dict[str, Any]:
        t = r.threshold_spec
        return {"recipe": r.name, "bundle_id": r.bundle.bundle_id, "bundle": str(r.bundle.path),
                "threshold": r.threshold.value, "threshold_file": None if isinstance(t, float) else str(t)}

    # ---- operations ------------------------------------------------------------------------------

    def list(self) -> dict[str, Any]:
        active = self.pipeline.active
        out = []
        for name, spec in self.specs.items():
            sb = self.standby.get(name)
            out.append({"name": name, "active": name == active.name, "bundle": str(spec.bundle),
                        "threshold": threshold_json(spec.threshold),
                        "preload": spec.preload,
                        "ready": name == active.name and active.runner is not None or _warm(sb),
                        "not_ready_reason": sb if isinstance(sb, str) else None})
        return {"line": self.line, "active": self._desc(active), "recipes": out,
                "shadow": self.shadow.stats() if self.shadow is not None else None,
                "rollback_available": active.name in self.previous or active.name in (self.state.get("previous") or {})}

    def switch(self, name: str, who: dict[str, Any], reason: str | None = None,
               deadline: float | None = None) -> dict[str, Any]:
        with self.lock:
            if name not in self.specs:
                raise RecipeNotReady(f"unknown recipe {name!r} (line {self.line} has: {', '.join(self.specs)})")
            current = self.pipeline.active
            if name == current.name and current.runner is not None:
                return {"line": self.line, "active": self._desc(current), "changed": False}
            sb = self.standby.get(name)
            if _warm(sb):
                new = sb
            else:  # not preloaded, a preload that failed, a recipe left without a working engine: open it now
                if isinstance(sb, ActiveRecipe):  # its engine failed or was closed (a fail-over) after it was parked
                    self.standby[name] = f"engine lost while in standby (backend {sb.backend})"
                    self.pipeline.retire(sb)
                    sb = self.standby[name]
                try:
                    new = self._open(self.specs[name])
                except RecipeNotReady as exc:
                    if isinstance(sb, str):
                        self.standby[name] = str(exc)
                    raise
            self._refuse_other_frames(new, opened=new is not sb)
            self._save_or_drop(dict(self.state, active=name), None if new is sb else new, deadline)
            old = self.pipeline.activate(new)
            self.standby.pop(name, None)
            if old.name != name and self.specs[old.name].preload and _warm(old):
                self.standby[old.name] = old    # stays warm for the next switch back
            elif old.name != name and self.specs[old.name].preload:
                # no working engine to keep warm (it failed to open, or failed and is being replaced):
                # a switch back opens it anew
                self.standby[old.name] = f"engine not working when switched away from ({old.backend})"
                self.pipeline.retire(old)
            elif old.name not in self.previous or self.previous[old.name] is not old:
                self.pipeline.retire(old)
            self._record("recipe", self._desc(old), self._desc(new), who, reason)
            return {"line": self.line, "active": self._desc(new), "changed": True}

    def _refuse_other_frames(self, recipe: ActiveRecipe, opened: bool) -> None:
        """A recipe whose bundle learned frames of another size than the camera delivers now, or colour
        frames where the camera delivers mono ones, would give every part the fail-safe verdict
        (preprocess.prepare): refused before anything changes, the engine opened for it closed again
        (`opened`)."""
        spec = recipe.bundle.input_spec
        trained, now = spec.frame_size, self.pipeline.last_frame_size
        if trained is not None and now is not None and tuple(trained) != now:
            why = (f"was trained on {trained[1]}x{trained[0]} frames, line {self.line}'s camera delivers "
                   f"{now[1]}x{now[0]}")
        elif spec.color_mode == "rgb" and self.pipeline.last_frame_channels == 1:
            why = f"was trained on colour frames, line {self.line}'s camera delivers mono frames"
        else:
            return
        if opened:
            self.pipeline.retire(recipe)
        raise RecipeNotReady(f"recipe {recipe.name!r}: its bundle {recipe.bundle.bundle_id} {why}: "
                             f"every part would get the fail-safe verdict; nothing changed")

    def _open_shadow(self, spec: RecipeSpec) -> ActiveRecipe:
        """The shadow bundle's engine (parity-gated, warm), on one ONNX Runtime intra-op thread unless
        the line sets it: the shadow must not take the CPUs from the line."""
        opts = {k: dict(v) for k, v in self.pipeline.settings.backend_options.items()}
        explicit = (self.cfg.backend_options.onnxruntime is not None
                    and self.cfg.backend_options.onnxruntime.intra_op_threads is not None)
        if "onnxruntime" in opts and not explicit:
            opts["onnxruntime"]["intra_op_threads"] = 1
        line_ort = self.pipeline.settings.backend_options.get("onnxruntime", {})
        if self.cfg.shadow is None and line_ort.get("spin"):
            from inspectd.engines.runtime.onnxruntime_backend import thread_budget, usable_cpus

            budget = thread_budget(usable_cpus())
            threads = int(line_ort.get("intra_op_threads") or 0) + int(opts["onnxruntime"].get("intra_op_threads") or 0)
            if threads > budget:
                # The line asked its engine to spin (backend_options.onnxruntime.spin), with no CPU for this shadow.
                log.warning("line %s: the shadow's engine thread does not fit the engines' %d CPUs beside the "
                            "line's spinning engine: the line's engine may answer a quarter to a third slower "
                            "while the shadow is busy (configure the shadow in the line's config, or set "
                            "backend_options.onnxruntime.spin: false, and restart)",
                            self.line, budget)
        # Off the critical path (and on one thread): timed, not held against the line's budget.
        return self._open(spec, settings=dataclasses.replace(self.pipeline.settings, backend_options=opts),
                          check_budget=False)

    def _start_shadow(self, spec: RecipeSpec, state: dict[str, Any], deadline: float | None = None) -> Any:
        """set_shadow: open the shadow bundle, persist `state`, start scoring."""
        recipe = self._open_shadow(spec)
        self._refuse_other_frames(recipe, opened=True)
        self._save_or_drop(state, recipe, deadline)
        return self._install_shadow(spec, recipe)

    def _install_shadow(self, spec: RecipeSpec, recipe: ActiveRecipe) -> Any:
        """Start the shadow scorer on an opened engine (under the lock), stopping the one it replaces."""
        from inspectd.daemon.shadow import ShadowScorer

        sc = self.cfg.shadow
        scorer = ShadowScorer(self.line, recipe, self.publisher, self.metrics,
                              queue_size=sc.queue_size if sc else 2, window=sc.correlation_window if sc else 200)
        old, self.shadow, self.shadow_spec = self.shadow, scorer, spec
        self.pipeline.shadow = scorer
        if old is not None:
            old.stop()
        log.info("line %s: shadow bundle %s (threshold %.4g) scoring alongside recipe %s", self.line,
                 recipe.bundle.bundle_id, recipe.threshold.value, self.pipeline.recipe)
        return scorer

    def set_shadow(self, bundle: str | None, threshold: Any, who: dict[str, Any],
                   reason: str | None = None, deadline: float | None = None) -> dict[str, Any]:
        with self.lock:
            old = self.shadow.stats() if self.shadow is not None else None
            if bundle is None:
                self._save_or_drop(dict(self.state, shadow=None), None, deadline)
                if self.shadow is not None:
                    self.pipeline.shadow = None
                    self.shadow.stop()
                self.shadow, self.shadow_spec = None, None
                self._record("shadow", old, None, who, reason)
                return {"line": self.line, "shadow": None}
            if isinstance(threshold, bool) or threshold is None:
                raise RecipeNotReady("shadow: a threshold (number) or threshold_file is required")
            spec = RecipeSpec("shadow", Path(bundle), float(threshold) if isinstance(threshold, (int, float))
                              else Path(threshold), self.pipeline.active.roi)
            scorer = self._start_shadow(spec, dict(self.state, shadow=spec.describe()), deadline)
            self._record("shadow", old, dict(spec.describe(), bundle_id=scorer.bundle_id), who, reason)
            return {"line": self.line, "shadow": scorer.stats()}

    def promote(self, who: dict[str, Any], reason: str | None = None,
                deadline: float | None = None) -> dict[str, Any]:
        """The shadow bundle becomes the active recipe's bundle (with its calibrated threshold file),
        after the parity gate passes on the line's backends; the old one is kept for rollback."""
        with self.lock:
            spec = self.shadow_spec
            if spec is None:
                raise RecipeNotReady("no shadow bundle to promote (set one: `shadow:` in the config or the socket)")
            if not isinstance(spec.threshold, Path):
                raise RecipeNotReady(f"shadow bundle has no calibrated threshold file (threshold "
                                     f"{spec.threshold}): run `inspectd calibrate` for it and set "
                                     f"threshold: {{file: ...}}")
            current = self.pipeline.active
            new = self._open(dataclasses.replace(spec, name=current.name, roi=current.roi))  # parity gate here
            promoted = RecipeSpec(current.name, spec.bundle, spec.threshold, current.roi,
                                  self.specs[current.name].preload)
            state = copy.deepcopy(self.state)
            state.setdefault("overrides", {})[current.name] = promoted.describe()
            state.setdefault("previous", {})[current.name] = {"bundle": str(current.bundle.path),
                                                              "threshold": threshold_json(current.threshold_spec)}
            state["shadow"] = None
            self._save_or_drop(state, new, deadline)
            old = self.pipeline.activate(new)
            prev = self.previous.pop(old.name, None)
            if prev is not None:
                self.pipeline.retire(prev)
            if _warm(old):                      # kept warm: rollback is a swap (else it opens from the state)
                self.previous[old.name] = old
            else:
                self.pipeline.retire(old)
            self.pipeline.shadow = None
            self.shadow.stop()
            self.shadow, self.shadow_spec = None, None
            self.specs[old.name] = promoted
            self._record("promote", self._desc(old), self._desc(new), who, reason)
            return {"line": self.line, "active": self._desc(new), "previous": self._desc(old)}

    def rollback(self, who: dict[str, Any], reason: str | None = None,
                 deadline: float | None = None) -> dict[str, Any]:
        with self.lock:
            current = self.pipeline.active
            warm = self.previous.get(current.name)
            if warm is not None and not _warm(warm):  # its engine failed since: open it from the state
                self.previous.pop(current.name)
                self.pipeline.retire(warm)
                warm = None
            entry = (self.state.get("previous") or {}).get(current.name)
            new = warm
            if new is None:
                if entry is None:
                    raise RecipeNotReady(f"nothing to roll back to for recipe {current.name!r} (no promote recorded)")
                new = self._open(dataclasses.replace(_from_state(current.name, entry, current.roi)))
            base = config_specs(self.cfg)[current.name]
            restored = RecipeSpec(current.name, Path(new.bundle.path), new.threshold_spec, new.roi, base.preload)
            state = copy.deepcopy(self.state)
            overrides = state.setdefault("overrides", {})
            if (restored.bundle, restored.threshold) == (base.bundle, base.threshold):
                overrides.pop(current.name, None)
            else:
                overrides[current.name] = restored.describe()
            (state.get("previous") or {}).pop(current.name, None)
            self._save_or_drop(state, None if new is warm else new, deadline)
            self.previous.pop(current.name, None)
            old = self.pipeline.activate(new)
            self.pipeline.retire(old)
            self.specs[current.name] = restored
            self._record("rollback", self._desc(old), self._desc(new), who, reason)
            return {"line": self.line, "active": self._desc(new), "previous": self._desc(old)}

    def threshold_spec(self, fresh: LineConfig | None) -> float | Path | None:
        """SIGHUP: the active recipe's threshold as the re-read config gives it (None: re-read the
        current file; a promoted bundle's threshold file is not in the config)."""
        name = self.pipeline.recipe
        if fresh is None or name in (self.state.get("overrides") or {}):
            return None
        spec = config_specs(fresh).get(name)
        return spec.threshold if spec is not None and self._same_model(spec) else None

    def _same_model(self, fresh: RecipeSpec, say: bool = True) -> bool:
        """SIGHUP: a threshold goes with the bundle and ROI it was set for. A re-read config that changed
        those too (a reload does not apply them) must not put its threshold on the engine still serving
        the old ones: that recipe keeps its threshold, and the operator is told to restart."""
        running = self.specs.get(fresh.name)
        changed = [what for what in ("bundle", "roi")
                   if running is not None and getattr(fresh, what) != getattr(running, what)]
        if not changed:
            return True
        if say:
            log.error("line %s: recipe %s keeps threshold %s: its %s changed in the config too, which a reload does "
                      "not apply, and the new threshold goes with %s; restart the daemon to serve them together",
                      self.line, fresh.name, threshold_json(running.threshold), " and ".join(changed),
                      "them" if len(changed) > 1 else "it")
        return False

    def reload_waiting(self, fresh: LineConfig | None, who: dict[str, Any]) -> None:
        """SIGHUP for the recipes that are not active (run.py reloads the active one): each spec takes
        its threshold as the re-read config now gives it (a promoted recipe keeps its own file), and
        every warm engine waiting in standby or for a rollback re-reads its threshold, so a
        recalibrated recipe judges with the new value from its first frame after a switch; the
        shadow bundle re-reads its threshold too."""
        with self.lock:
            overrides = self.state.get("overrides") or {}
            if fresh is not None:
                for name, spec in config_specs(fresh).items():
                    # the active recipe's mismatch was said by threshold_spec
                    if (name in self.specs and name not in overrides
                            and self._same_model(spec, say=name != (self.pipeline and self.pipeline.recipe))):
                        self.specs[name] = dataclasses.replace(self.specs[name], threshold=spec.threshold)
            for pool in (self.standby, self.previous):
                for name, r in list(pool.items()):
                    if not isinstance(r, ActiveRecipe):  # a preload that failed: its reason, no engine
                        continue
                    # standby: its spec's (re-read) threshold; rollback: its own file, re-read
                    spec = self.specs[name].threshold if pool is self.standby and name in self.specs else None
                    self._reload_recorded(r, spec, who, "SIGHUP reload (recipe waiting)")
            if self.shadow is not None and self.shadow_spec is not None:
                # The shadow's verdicts and agreement are what a promote is decided on: a recalibrated
                # candidate judges with its new threshold (the config's, for the config's shadow).
                shadow_threshold: float | Path | None = None  # None: re-read its own file
                if (fresh is not None and fresh.shadow is not None and self.state.get("shadow", "config") == "config"
                        and Path(fresh.shadow.bundle) == self.shadow_spec.bundle):
                    shadow_threshold = _spec_threshold(fresh.shadow.threshold)
                    self.shadow_spec = dataclasses.replace(self.shadow_spec, threshold=shadow_threshold)
                self._reload_recorded(self.shadow.recipe, shadow_threshold, who, "SIGHUP reload (shadow)")

    def stop(self) -> None:
        if self.shadow is not None:
            self.shadow.stop(1.0)
        for r in list(self.standby.values()) + list(self.previous.values()):
            if isinstance(r, ActiveRecipe) and r.runner is not None:
                r.runner.close(0.5)
