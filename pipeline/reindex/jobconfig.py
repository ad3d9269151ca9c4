"""The YAML job config of `icar reindex`: typed sections, validated with errors that name the bad field.

A job config says what to embed (inputs), where everything lives (root), with which model, and how the
index is built, published and kept. Example (jobs/examples/*.yaml has complete ones)::

    name: nightly-laion
    inputs: ["s3://bucket/laion/*.tar"]
    root: s3://bucket/icar/laion
    model: {name: ViT-L-14, pretrained: laion2b_s32b_b82k, heads: heads.safetensors, router: router.json}
    index: {max_memory: 16G, target_recall: 0.9}
    retention: {keep_versions: 3}
    on_model_change: refuse

Every problem found is reported at once, each as ``path: what was expected, got what``, e.g.
``index.max_memory: expected a size like 4G, got 'lots'``. Strings may use ``${VAR}`` or ``${VAR:-default}``
to take values from the environment (bucket names, addresses injected by a scheduler). The defaults of
the embed and index settings come from EmbedConfig/ModelSpec and IndexConfig (one source of truth).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.embed.config import EmbedConfig
from pipeline.index.build import IndexConfig
from pipeline.model.spec import ModelSpec
from pipeline.runtime import DEVICES, PRECISIONS, parse_device


class ConfigError(ValueError):
    """The job config is invalid; ``errors`` lists every problem as 'field.path: message'."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = list(errors)
        lines = "\n  - ".join(self.errors)
        super().__init__(f"{source}: {len(self.errors)} problem(s) in the job config:\n  - {lines}")


def _default(cls, name: str):
    """Return the default of dataclass field ``name`` of ``cls`` (so the YAML defaults equal the CLI's)."""
    f = cls.__dataclass_fields__[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _index_default(name: str):
    """Return IndexConfig's default for ``name``."""
    return _default(IndexConfig, name)


# ------------------------------------------------------------------------------------------- checks

SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtTpP]?)(?:i?[bB])?\s*")
_CRON_ITEM = r"(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?"  # *, 5, 1-5, MON-FRI, */15, 0-30/5
CRON_FIELD_RE = re.compile(rf"^{_CRON_ITEM}(,{_CRON_ITEM})*$")


def check_size(value) -> str | None:
    """Return an error unless ``value`` is a positive size like 4G, 512M or a byte count."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return None
    if isinstance(value, str) and SIZE_RE.fullmatch(value) and float(SIZE_RE.fullmatch(value).group(1)) > 0:
        return None
    return f"expected a size like 4G, got {value!r}"


def check_fraction(value) -> str | None:
    """Return an error unless 0 < value <= 1."""
    return None if 0 < value <= 1 else f"expected a number in (0, 1], got {value!r}"


def check_positive(value) -> str | None:
    """Return an error unless value > 0."""
    return None if value > 0 else f"expected a number > 0, got {value!r}"


def check_at_least_one(value) -> str | None:
    """Return an error unless value >= 1."""
    return None if value >= 1 else f"expected an integer >= 1, got {value!r}"


def check_growth(value) -> str | None:
    """Return an error unless value > 1 (a growth factor)."""
    return None if value > 1 else f"expected a factor > 1 (e.g. 2.0), got {value!r}"


def check_cron(value) -> str | None:
    """Return an error unless ``value`` is a five-field cron expression (as a Kubernetes CronJob takes)."""
    if value is None:
        return None
    if value.startswith("@"):
        ok = value in ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
        return None if ok else f"expected a cron macro like @daily, got {value!r}"
    parts = value.split()
    if len(parts) != 5 or not all(CRON_FIELD_RE.match(p) for p in parts):
        return f"expected a five-field cron expression like '0 2 * * *' (minute hour day month weekday), got {value!r}"
    return None


def check_inputs(value) -> str | None:
    """Return an error for an empty input list."""
    return None if value else "expected at least one input path, glob or URL"


def check_nonempty(value) -> str | None:
    """Return an error for an empty string."""
    return None if value and value.strip() else "expected a non-empty string"


def check_name(value) -> str | None:
    """Return an error unless the job name is usable in file names and Kubernetes labels."""
    if re.fullmatch(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?", value or ""):
        return None
    return f"expected a lower-case name of letters, digits, '-', '_' or '.' (at most 63), got {value!r}"


def _field(default=dataclasses.MISSING, check=None, **kw):
    """Return a dataclass field whose value ``check`` validates (it returns an error message or None)."""
    return field(default=default, metadata={"check": check} if check else {}, **kw)


def _optional(check):
    """Return ``check`` that also accepts None."""
    return lambda v: None if v is None else check(v)


def _embed_default(name: str):
    return _default(EmbedConfig, name)


# ------------------------------------------------------------------------------------------- sections


@dataclass
class EmbedSettings:
    """How input shards are read and embedded (`icar embed`'s execution options)."""

    batch_size: int = _field(_embed_default("batch_size"), check_at_least_one)  # images per model call
    image_column: str | None = None  # Parquet image-bytes column; None: auto-detect (jpg, image, bytes, img)
    max_pixels: int = _field(_embed_default("max_pixels"), check_at_least_one)  # decompression-bomb limit per image
    batches_in_flight: int = _field(_embed_default("batches_in_flight"), check_at_least_one)  # queued per shard task
    shard_retries: int = _embed_default("shard_retries")  # retries of a failing input shard before it is reported
    shard_timeout_s: float = _field(_embed_default("shard_timeout_s"), check_positive)  # slower shard tasks: cancelled
    actor_start_timeout_s: float = _field(_embed_default("actor_start_timeout_s"), check_positive)  # actors up by then


@dataclass
class RaySettings:
    """Where the job runs and what it reserves there."""

    address: str | None = None  # cluster to join ("auto" in a RayJob); None: $RAY_ADDRESS, else an embedded local Ray
    num_actors: int | None = None  # model actors; None: one per GPU, or 1 on a CPU-only cluster
    gpus_per_actor: float = _field(_embed_default("gpus_per_actor"), check_positive)  # GPU share of a model actor
    cpus_per_actor: float = _field(_embed_default("cpus_per_actor"), check_positive)  # CPUs reserved per model actor
    decode_tasks: int | None = None  # input shards decoded at once; None: the CPUs left beside the actors
    index_workers: int | None = None  # concurrent index add tasks; None: the cluster's CPUs; 1 (no address): driver


@dataclass
class IndexSettings:
    """How each index version is built, when a trained index is reused, and how it is verified."""

    max_memory: str = _field("4G", check_size)  # budget of the built index (1024-based K/M/G/T)
    max_build_memory: str | None = _field(None, _optional(check_size))  # peak build memory; None: 75% of RAM
    factory: str | None = None  # FAISS factory string overriding the automatic choice (e.g. "OPQ32,IVF4096,PQ32")
    target_recall: float = _field(0.9, check_fraction)  # recall@k vs exact that nprobe must reach; verified
    k: int = _field(10, check_at_least_one)  # the k of recall@k
    queries: int = _field(1000, check_at_least_one)  # held-out queries for tuning and the recall check
    text_queries: bool | None = None  # tune on caption queries too; None: when captions and the text encoder exist
    seed: int = 0  # sampling and k-means seed
    flat_below: int = _field(50_000, check_at_least_one)  # exact search (Flat) below this many vectors
    max_nprobe: int = _field(4096, check_at_least_one)  # largest nprobe tried while tuning
    reuse_trained: bool = True  # add into the previous version's trained index when the rules allow it
    retrain_growth: float = _field(2.0, check_growth)  # retrain once the corpus grew this much since training
    retrain_list_growth: float = _field(2.0, check_growth)  # retrain once the guideline asks this many times more lists
    retrain_nprobe_growth: float = _field(2.0, check_growth)  # retrain once nprobe for the target grew this much
    force: bool = False  # build a new version even when nothing changed since LATEST
    verify_open: bool = True  # verification reads the index back with faiss.read_index (downloads it from S3)


@dataclass
class RetentionSettings:
    """Which index versions and model generations are kept."""

    keep_versions: int = _field(3, check_at_least_one)  # verified versions kept, LATEST included
    delete_old_generations: bool = False  # delete run directories of earlier models once no kept version uses them


@dataclass
class ScheduleSettings:
    """When the job runs (metadata: the scheduler, e.g. infra/k8s/cronjob-reindex.yaml, holds the real schedule)."""

    cron: str | None = _field(None, check_cron)  # five-field cron, e.g. "0 2 * * *"
    timezone: str = "UTC"  # time zone of the cron expression
    owner: str | None = None  # who is paged when it fails (shown in logs and the reindex log)
    description: str | None = None  # what this job is for


@dataclass
class LockSettings:
    """The lock that keeps two runs of the job from writing the same root at once."""

    heartbeat_s: float = _field(60.0, check_positive)  # the holder refreshes the lock this often
    stale_after_s: float = _field(1800.0, check_positive)  # a lock not refreshed for this long is taken over


@dataclass
class JobConfig:
    """One scheduled reindex job: what to embed, where, with which model, and how indexes are published."""

    name: str = _field(check=check_name)  # job name: in logs, the lock and the reindex log
    inputs: list[str] = _field(check=check_inputs)  # fsspec URLs, globs or directories (one input shard per file)
    root: str = _field(check=check_nonempty)  # output root: generations/, indexes/, reindex-log/ (path or URL)
    model: ModelSpec = field(default_factory=ModelSpec)  # model, exits, heads, router, scorer (as `icar embed`)
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    lock: LockSettings = field(default_factory=LockSettings)
    on_model_change: Literal["refuse", "new_generation"] = "refuse"  # another model: stop, or re-embed everything
    max_retire_fraction: float = _field(0.5, check_fraction)  # more committed inputs gone than this: stop
    storage_options: dict = field(default_factory=dict)  # fsspec options for inputs and root; never logged
    progress: bool = False  # progress bars on stderr (off for schedulers: logs carry the progress)
    source: str = "<config>"  # where this config was read from (set by load_job_config)

    def embed_config(self, run: str) -> EmbedConfig:
        """Return the EmbedConfig of one incremental embed into run directory ``run``."""
        e, r = self.embed, self.ray
        return EmbedConfig(inputs=list(self.inputs), output=run, spec=dataclasses.replace(self.model),
                           batch_size=e.batch_size, image_column=e.image_column, max_pixels=e.max_pixels,
                           address=r.address, num_actors=r.num_actors, gpus_per_actor=r.gpus_per_actor,
                           cpus_per_actor=r.cpus_per_actor, decode_tasks=r.decode_tasks,
                           batches_in_flight=e.batches_in_flight, shard_retries=e.shard_retries,
                           shard_timeout_s=e.shard_timeout_s, actor_start_timeout_s=e.actor_start_timeout_s,
                           storage_options=dict(self.storage_options), progress=self.progress,
                           reembed_changed=True, lock_stale_after_s=self.lock.stale_after_s,
                           lock_heartbeat_s=self.lock.heartbeat_s)

    def index_config(self, run: str, output: str, **overrides):
        """Return the IndexConfig that builds index directory ``output`` from run directory ``run``."""
        i = self.index
        kw = dict(runs=[run], output=output, max_index_memory=i.max_memory, max_build_memory=i.max_build_memory,
                  factory=i.factory, target_recall=i.target_recall, k=i.k, queries=i.queries,
                  text_queries=i.text_queries, workers=self.ray.index_workers, address=self.ray.address,
                  seed=i.seed, flat_below=i.flat_below, max_nprobe=i.max_nprobe,
                  storage_options=dict(self.storage_options), progress=self.progress,
                  lock_stale_after_s=self.lock.stale_after_s, lock_heartbeat_s=self.lock.heartbeat_s)
        kw.update(overrides)
        return IndexConfig(**kw)


# ------------------------------------------------------------------------------------------- parsing

ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ALIASES = {"model": {"name": "model"}}  # section -> {yaml key: field}; `model.name` reads better than `model.model`


def expand_env(text: str, path: str, errors: list[str]) -> str:
    """Return ``text`` with ${VAR} / ${VAR:-default} replaced from the environment; record unset variables."""

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None or value == "":
            if m.group(2) is not None:
                return m.group(2)
            errors.append(f"{path}: environment variable {m.group(1)} is not set (used as {m.group(0)}); "
                          f"set it or write ${{{m.group(1)}:-default}}")
            return m.group(0)
        return value

    return ENV_RE.sub(sub, text)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp, path: str, errors: list[str]) -> Any:
    """Return ``value`` converted to type ``tp``; on a mismatch record an error and return None."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            before = len(errors)
            out = _convert(value, inner[0], path, errors)
            if len(errors) > before and type(None) in args and errors[-1].startswith(f"{path}: expected"):
                errors[-1] = errors[-1] + " (or null)"
            return out
    if value is None:
        errors.append(f"{path}: expected {_type_name(tp)}, got null")
        return None
    if isinstance(value, str) and tp is not bool:
        value = expand_env(value, path, errors)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}{hint}")
            return None
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return None
        return [_convert(v, args[0], f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return None
        return {k: (expand_env(v, f"{path}.{k}", errors) if isinstance(v, str) else v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _from_mapping(tp, value, path, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return None
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a size written as 4096, or a numeric tag
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
            return None
        return value
    raise TypeError(f"jobconfig cannot convert to {tp!r} (field {path}): a bug in pipeline/reindex/jobconfig.py")


def _from_mapping(cls, data: Any, path: str, errors: list[str]):
    """Return a ``cls`` dataclass built from mapping ``data``; record every problem under ``path``."""
    where = path or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping of settings, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    aliases = ALIASES.get(path, {})
    kwargs: dict[str, Any] = {}
    prefix = f"{path}." if path else ""
    for key, value in data.items():
        name = aliases.get(key, key)
        if not isinstance(key, str) or name not in fields:
            known = sorted(set(fields) | set(aliases))
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            errors.append(f"{prefix}{key}: unknown setting{hint}")
            continue
        if name in kwargs:
            errors.append(f"{prefix}{key}: given twice (as {name!r} and its alias)")
            continue
        before = len(errors)
        converted = _convert(value, hints[name], f"{prefix}{key}", errors)
        check = fields[name].metadata.get("check")
        if len(errors) == before and check is not None:
            problem = check(converted)
            if problem:
                errors.append(f"{prefix}{key}: {problem}")
        kwargs[name] = converted
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{name}: required setting is missing")
    try:
        # Bad values were recorded and stand as None: the object only lets the remaining sections be checked.
        return cls(**kwargs)
    except TypeError:  # a required field is missing (recorded above)
        return None


def _cross_checks(cfg: JobConfig, errors: list[str]) -> None:
    """Record problems that involve more than one field."""
    m = cfg.model
    routing = [n for n, on in (("model.router", m.router is not None), ("model.exit_at", m.exit_at is not None),
                               ("model.full_depth", m.full_depth), ("model.route_fractions", m.route_fractions))
               if on]
    if len(routing) > 1:
        errors.append(f"{routing[1]}: choose one routing setting, {' and '.join(routing)} are both given")
    if m.scorer not in ("default", "heuristic", "convnext", "none"):
        errors.append(f"model.scorer: expected one of 'default', 'heuristic', 'convnext', 'none', got {m.scorer!r}")
    if m.scorer == "convnext" and not m.scorer_checkpoint:
        errors.append("model.scorer_checkpoint: required with scorer: convnext (a ConvNeXt-IC checkpoint)")
    try:
        parse_device(m.device)
    except ValueError:
        errors.append(f"model.device: expected {DEVICES}, got {m.device!r}")
    if m.precision not in PRECISIONS:
        errors.append(f"model.precision: expected one of {', '.join(PRECISIONS)}, got {m.precision!r}")
    if cfg.lock.stale_after_s < 3 * cfg.lock.heartbeat_s:
        errors.append(f"lock.stale_after_s: must be at least 3 x lock.heartbeat_s ({3 * cfg.lock.heartbeat_s:g}) so "
                      f"that a slow heartbeat never looks stale, got {cfg.lock.stale_after_s:g}")


def parse_job_config(data: Any, source: str = "<config>") -> JobConfig:
    """Return the JobConfig described by ``data`` (parsed YAML); raise ConfigError listing every problem."""
    errors: list[str] = []
    cfg = _from_mapping(JobConfig, data, "", errors)
    if cfg is not None and not errors:
        _cross_checks(cfg, errors)
    if errors or cfg is None:
        raise ConfigError(source, errors or ["the config could not be read"])
    cfg.source = source
    return cfg


def load_job_config(path: str) -> JobConfig:
    """Return the validated JobConfig in YAML file ``path``; raise ConfigError naming each bad field."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, [f"cannot read the config file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, [f"not a text file (byte {e.start} is not UTF-8): pass the YAML job config, "
                                 f"e.g. one of jobs/examples/*.yaml"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(path, [f"not valid YAML{where}: {getattr(e, 'problem', None) or e}"]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(path, [f"nested too deeply to parse; a job config is at most {MAX_CONFIG_DEPTH} levels "
                                 f"deep (see jobs/examples/)"]) from None
    depth = _nesting_depth(data)
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigError(path, [f"nested {depth} levels deep; a job config is at most {MAX_CONFIG_DEPTH} levels "
                                 f"deep (see jobs/examples/)"])
    return parse_job_config(data, source=path)


# Deepest nesting a job config may have: its settings are 2-3 levels deep; the bound keeps a hostile or broken file
# from reaching the recursive validation below with thousands of levels.
MAX_CONFIG_DEPTH = 16


def _nesting_depth(data: Any) -> int:
    """Return how many levels of mappings and lists ``data`` holds (0 for a scalar), without recursion."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
        if level + 1 <= MAX_CONFIG_DEPTH:  # deeper than the bound is already enough to refuse
            stack.extend((c, level + 1) for c in children)
    return deepest


def config_summary(cfg: JobConfig) -> dict:
    """Return the config as a JSON-ready dict without storage options (they may hold credentials)."""
    d = dataclasses.asdict(cfg)
    d["storage_options"] = sorted(d["storage_options"])  # names only
    return d
