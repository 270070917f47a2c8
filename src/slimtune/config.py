"""Typed run configuration: YAML recipe + ``key=value`` overrides -> validated dataclasses.

Every field is documented by the string literal under it; :func:`field_docs` reads those strings
so that ``slimtune methods`` and error messages show them. Validation errors name the field
(``train.batch_size``), what was expected and what was given.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from . import registry
from .errors import SlimtuneError


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """Bundled name (smollm2-135m, gemma3-270m, tiny-llama), a local Hugging Face directory, a .gguf file, or a hub id."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype the weights are held in (the recipe's `base` defaults to it)."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint to run. Off unless you trust the source."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers (sdpa, eager, ...); default: transformers' choice."""


@dataclass
class DataConfig:
    path: str = ""
    """JSONL/JSON/CSV/Parquet file, a `datasets.save_to_disk` directory, or pkg:PACKAGE/sub/path for data shipped in an installed package. Format text also reads a .txt file (one document per blank-line-separated block) or a directory of .txt files (one document per file, in file-name order)."""
    format: Literal["text", "alpaca", "messages", "classification", "preference"] = "text"
    """How records become prompt/response pairs."""
    split: str | None = None
    """Split to use when the path holds a DatasetDict (e.g. train)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column names, where they differ from the format's defaults (e.g. {text: sentence})."""
    template: str | None = None
    """Prompt template with {column} placeholders (alpaca and classification)."""
    label_words: list[str] = field(default_factory=list)
    """classification: the answer text for label 0, 1, ...; the label column may also hold the words."""
    chat: bool = False
    """Wrap the prompt in the tokenizer's chat template (the response becomes the assistant turn)."""
    chat_template: str | None = None
    """Jinja chat template (the text, or a file holding it) for chat and format messages: for a tokenizer without one (e.g. from a GGUF file), or to replace the tokenizer's."""
    system: str | None = None
    """System message for chat prompts."""
    max_seq_len: int = 512
    """Longest sequence in tokens; what gives way in longer examples: see truncate."""
    truncate: Literal["field", "prompt_start"] = "field"
    """What gives way when an example is longer than max_seq_len. field: a prompt made from a template (alpaca, classification) keeps its wording and the answer, and its longest {column} value is cut from its end (the prompt start is cut only if the template alone is too long), and a conversation (messages) loses its oldest exchanges, its system message kept (its end is cut only if the last exchange alone is too long); prompt_start: the start of the prompt is cut, a conversation's end. Prompts without a template lose their start either way."""
    packing: bool = False
    """Pack whole training examples into rows of up to max_seq_len tokens (no padding between them); each keeps its own positions and attends only to itself. Held-out examples stay one per row."""
    eval_path: str | None = None
    """Separate held-out data; otherwise eval_size rows of `path` are held out."""
    eval_size: float = 0.0
    """Held-out part of `path`: a fraction (< 1) or a row count (>= 1)."""
    limit: int | None = None
    """Use at most this many training rows (after the shuffle and the split)."""
    seed: int = 0
    """Seed of the shuffle that precedes the train/eval split."""


@dataclass
class TrainConfig:
    steps: int = 0
    """Optimizer steps; 0 means `epochs` passes over the training data."""
    epochs: float = 1.0
    """Passes over the training data when steps is 0."""
    batch_size: int = 4
    """Examples per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward instead of storing them (less memory, ~1/3 more compute)."""
    trim_memory: bool = False
    """CPU with glibc: give freed heap pages back to the OS after every transformer block (malloc_trim), for a lower peak RSS at a few % more step time."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast compute dtype (through accelerate)."""
    sharding: Literal["none", "fsdp"] = "none"
    """Across processes: none (each process holds the whole model; gradients averaged as DDP does) or fsdp (PyTorch FSDP2: weights, gradients and optimizer state split over the processes by decoder block, gathered block by block in forward and backward; CPU (gloo) or CUDA)."""
    loss_chunk_tokens: int = 256
    """Tokens per chunk of the chunked cross-entropy: full-vocabulary logits exist for one chunk at a time."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    eval_before: bool = True
    """Evaluate once before the first step, so the run reports its own baseline."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: none)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 1
    """Write a metrics.jsonl row every N steps."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    report_to: list[str] = field(default_factory=list)
    """accelerate trackers (tensorboard, wandb, ...)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class EvalConfig:
    batch_size: int = 8
    """Examples per evaluation forward."""
    max_examples: int | None = None
    """Evaluate on at most this many held-out examples."""
    generate: int = 0
    """Number of held-out prompts to answer with greedy generation in the report."""
    max_new_tokens: int = 32
    """Length of those generations."""


@dataclass
class FederatedConfig:
    strategy: str = "fedavg"
    """A registered strategy (slimtune.federated.strategies): fedavg: weighted average of the trainable state; fedkseed: MeZO steps on K shared seeds, only {seed: scalar} travels; ferret: first-order steps, update sent as coordinates on shared random directions."""
    rounds: int = 3
    """Federated rounds; each client runs train.steps local steps per round."""
    clients: int = 2
    """Number of clients (simulation: virtual SuperNodes; deployment: partitions)."""
    clients_per_round: int = 0
    """Clients sampled each round (0: all connected)."""
    min_clients: int = 1
    """A round needs at least this many clients to be sampled, and this many accepted updates to change the global model."""
    round_timeout: float = 0.0
    """Seconds to wait for replies in a round (0: no limit); late clients count as dropped."""
    partition: Literal["iid", "dirichlet", "files"] = "iid"
    """How data.path is split over clients: iid, dirichlet over labels (classification data), or files (one file per client)."""
    alpha: float = 0.5
    """Dirichlet concentration: small values give skewed label mixes."""
    files: list[str] = field(default_factory=list)
    """partition=files: one data file per client, read with the data section's settings."""
    lora_aggregation: Literal["product", "separate"] = "product"
    """fedavg of LoRA pairs: product averages the updates B A and re-factorises them by SVD (the best rank-r fit of the average); separate averages A and B on their own (FS-LLM), which is not the average of B A."""
    compress: Literal["none", "compeft"] = "none"
    """Uplink compression of adapter updates: compeft keeps the top density fraction of each update by magnitude as sign bits and one scale per tensor."""
    compeft_density: float = 0.1
    """ComPEFT: fraction of each update's entries kept."""
    seeds: int = 4096
    """fedkseed: K candidate seeds; ferret: seeds per round shared by the tensors."""
    seed_sampling: Literal["uniform", "pro"] = "uniform"
    """fedkseed: draw seeds uniformly or with FedKSeed-Pro probabilities (from the accumulated scalars)."""
    server_lr: float = 1.0
    """ferret: the server moves the weights by server_lr times the averaged reconstructed update."""
    clip: float = 0.0
    """ferret: clip the norm of each tensor's reconstructed update to this (0: no clipping)."""
    memory_budgets_mb: list[float] = field(default_factory=list)
    """Heterogeneous clients: one memory budget per client (MB); each client gets the largest LoRA rank in `ranks` and batch in `batch_sizes` whose estimate fits."""
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])
    """Heterogeneous clients: LoRA ranks to choose from."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Heterogeneous clients: batch sizes to choose from."""
    seed: int = 0
    """Seed of partitioning, client sampling and the shared random directions."""
    cpus_per_client: float = 1.0
    """Simulation: CPU cores reserved per virtual client."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out data."""
    base: Any = None
    """How the frozen weights are stored: a registered base (fp32, bf16, fp16; nf4, fp4, int8 quantised) or {name: ..., option: ...}; default: model.dtype."""
    params: Any = None
    """Which parameters train, and in what form: {name: lora, r: 8, ...} or just a method name."""
    optimizer: Any = None
    """How an update is computed: {name: adamw, lr: 1e-4, ...} or just a name."""
    objective: Any = None
    """The loss the optimizer minimises: {name: causal-lm} (the default) or just a name."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop's settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    """`slimtune fed` only: strategy, rounds, clients, partitioning."""
    output_dir: str = "runs/latest"
    """Run directory: resolved config, metrics.jsonl, summary.json, checkpoints, final artefacts."""
    overwrite: bool = False
    """Replace an existing non-empty output_dir."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    resume_changes: list[str] = field(default_factory=list)
    """Fields (e.g. [train.steps, optimizer.lr]) a resumed run may change from the checkpointed recipe; any other change is refused, since the resumed run would no longer equal an uninterrupted one. Changes are recorded in metrics.jsonl."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in registry.AXES:
                value = {"name": value.name, **dataclasses.asdict(value)}
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with messages that name the field
# ---------------------------------------------------------------------------------------------


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (PEP 257 attribute docstrings), or, for a
    field made in code (the registry's ``name``), its ``metadata["doc"]``."""
    docs: dict[str, str] = {
        f.name: f.metadata["doc"] for f in dataclasses.fields(cls) if "doc" in f.metadata
    }
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (a field's annotation), or a one-line error naming ``where``."""
    origin = typing.get_origin(tp)
    bad = SlimtuneError(f"config: {where}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except SlimtuneError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (list, dict):
        return _coerce_container(value, tp, where, bad)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp in (bool, int, float, str):
        return _coerce_scalar(value, tp, where, bad)
    return value


def _coerce_container(value: Any, tp: Any, where: str, bad: SlimtuneError) -> Any:
    """A ``list[X]`` or ``dict[str, X]`` field, each item coerced and named by its position."""
    if typing.get_origin(tp) is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected is the list of that item
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        raise bad
    _, vt = typing.get_args(tp)
    return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}


def _coerce_scalar(value: Any, tp: type, where: str, bad: SlimtuneError) -> Any:
    """A bool, int, float or str field. YAML's loose scalars are taken where unambiguous (1.0
    as an int, "1e-4" as a float, 8 as a str); a bool is never a number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if number:
            return str(value)
        raise bad
    try:  # float; YAML 1.1 reads "1e-4" as a string
        result = float(value) if number or isinstance(value, str) else None
    except ValueError:
        raise bad from None
    if result is None:
        raise bad
    # No recipe field means anything with nan or inf (a limit of "none" is spelt 0), and
    # either would pass every range check below (nan compares false) and spoil the run.
    if not math.isfinite(result):
        raise SlimtuneError(f"config: {where}: expected a finite number, got {value!r}")
    return result


def build(cls: type, data: Any, where: str) -> Any:
    """Make ``cls`` from a mapping; unknown keys and wrong types raise :class:`SlimtuneError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SlimtuneError(f"config: {where or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    # a Config that takes another library's options (params: peft) gathers unknown keys into
    # one mapping field, which its own validation checks
    gather = getattr(cls, "open_options", None)
    if gather is not None:
        extra_keys = {k: v for k, v in data.items() if k not in fields}
        given = data.get(gather) or {}
        if not isinstance(given, dict):
            raise SlimtuneError(f"config: {where}.{gather}: expected a mapping, got {given!r}")
        data = {k: v for k, v in data.items() if k in fields}
        if extra_keys or given:
            data[gather] = {**given, **extra_keys}
    for key, value in data.items():
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            allowed = ", ".join(fields)
            scope = where or "top level of the recipe"
            raise SlimtuneError(
                f"config: {scope}: unknown key {key!r}{extra}; allowed keys: {allowed}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise SlimtuneError(f"config: {where or 'recipe'}: {e}") from None
    return obj


def _method(axis: str, spec: Any, default: str) -> Any:
    """A method spec (name or {name: ..., field: ...}) -> that method's validated config object."""
    if spec is None:
        spec = default
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise SlimtuneError(f"config: {axis}: expected a method name or a mapping with 'name'")
    spec = dict(spec)
    cls = registry.get(axis, str(spec.pop("name")))
    return build(cls.Config, spec, axis)  # its ``name`` field is the registered name


def _base(spec: Any, model: ModelConfig, given: Any) -> Any:
    """The recipe's base; ``model.dtype`` names it when ``base`` is not set. A dense base (one
    of model.dtype's choices) is the model's dtype, and a quantised base's ``compute_dtype`` is
    the dtype of its unquantised parts, so the two must agree when both are given."""
    base = _method("base", spec, model.dtype)
    dense = typing.get_args(typing.get_type_hints(ModelConfig)["dtype"])
    want = base.name if base.name in dense else getattr(base, "compute_dtype", None)
    if want is not None:
        named = isinstance(given, dict) and "dtype" in given
        if named and model.dtype != want:
            what = repr(base.name)
            if base.name != want:
                what += f" computes in {want!r} (base.compute_dtype), which"
            raise SlimtuneError(
                f"config: base: {what} disagrees with model.dtype {model.dtype!r}; set one of them"
            )
        model.dtype = want
    return base


SEED_MAX = 2**32 - 1  # numpy's seeding (accelerate's set_seed seeds numpy too) takes 0..2**32-1


def _check_ranges(cfg: RunConfig) -> None:
    """Ranges of the recipe's numeric fields (types were checked while building)."""
    t, d, e, f = cfg.train, cfg.data, cfg.eval, cfg.federated
    at_least = [
        ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum", t.grad_accum, 1),
        ("train.steps", t.steps, 0),
        ("train.warmup_steps", t.warmup_steps, 0),
        ("train.eval_every", t.eval_every, 0),
        ("train.save_every", t.save_every, 0),
        ("train.keep_checkpoints", t.keep_checkpoints, 1),
        ("train.log_every", t.log_every, 1),
        ("train.loss_chunk_tokens", t.loss_chunk_tokens, 1),
        ("train.max_grad_norm", t.max_grad_norm, 0),
        ("train.seed", t.seed, 0),
        ("data.max_seq_len", d.max_seq_len, 2),
        ("data.eval_size", d.eval_size, 0),
        ("data.seed", d.seed, 0),
        ("eval.batch_size", e.batch_size, 1),
        ("eval.generate", e.generate, 0),
        ("eval.max_new_tokens", e.max_new_tokens, 1),
        ("federated.round_timeout", f.round_timeout, 0),
        ("federated.clip", f.clip, 0),
        ("federated.seed", f.seed, 0),
    ]
    if d.limit is not None:
        at_least.append(("data.limit", d.limit, 1))
    if e.max_examples is not None:
        at_least.append(("eval.max_examples", e.max_examples, 1))
    for name, value, low in at_least:
        if value < low:
            raise SlimtuneError(f"config: {name}: must be >= {low}, got {value}")
    above_zero = [
        ("federated.server_lr", f.server_lr),
        ("federated.cpus_per_client", f.cpus_per_client),
    ]
    above_zero += [
        (f"federated.memory_budgets_mb[{i}]", v) for i, v in enumerate(f.memory_budgets_mb)
    ]
    above_zero += [(f"federated.ranks[{i}]", v) for i, v in enumerate(f.ranks)]
    above_zero += [(f"federated.batch_sizes[{i}]", v) for i, v in enumerate(f.batch_sizes)]
    for name, value in above_zero:
        if value <= 0:
            raise SlimtuneError(f"config: {name}: must be > 0, got {value}")
    for name, value in [("train.seed", t.seed), ("data.seed", d.seed), ("federated.seed", f.seed)]:
        if value > SEED_MAX:
            raise SlimtuneError(f"config: {name}: must be <= {SEED_MAX}, got {value}")
    if f.strategy not in (strategies := registry.names("strategy")):
        choices = ", ".join(repr(s) for s in strategies)
        raise SlimtuneError(
            f"config: federated.strategy: expected one of {choices}, got {f.strategy!r}"
        )
    if t.epochs <= 0:
        raise SlimtuneError(f"config: train.epochs: must be > 0, got {t.epochs}")
    if t.report_to:
        _check_trackers(t.report_to)
    if not d.path:
        raise SlimtuneError("config: data.path: required (a data file, directory or pkg:path)")


def _check_trackers(names: list[str]) -> None:
    """train.report_to: accelerate's tracker names, each installed (accelerate would otherwise
    fail deep inside the run, after the model has loaded)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    known = ["all", *LOGGER_TYPE_TO_CLASS]
    available = {str(getattr(x, "value", x)) for x in get_available_trackers()}
    for i, name in enumerate(names):
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SlimtuneError(
                f"config: train.report_to[{i}]: unknown tracker {name!r}{extra}; "
                f"choose from {', '.join(known)}"
            )
        if name != "all" and name not in available:
            raise SlimtuneError(
                f"config: train.report_to[{i}]: tracker {name!r} is not installed "
                f"(pip install {name.replace('_', '-')})"
            )


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a whole recipe (already parsed) into a :class:`RunConfig`."""
    data = dict(data or {})
    base = data.pop("base", None)
    params = data.pop("params", None)
    optimizer = data.pop("optimizer", None)
    objective = data.pop("objective", None)
    cfg = build(RunConfig, data, "")
    cfg.base = _base(base, cfg.model, data.get("model"))
    cfg.params = _method("params", params, "full")
    cfg.optimizer = _method("optimizer", optimizer, "adamw")
    cfg.objective = _method("objective", objective, "causal-lm")
    _check_ranges(cfg)
    return cfg


def _as_spec(key: str, value: Any) -> Any:
    """A method axis given as a bare name (``params=lora``) is the spec ``{name: lora}``."""
    if key in registry.AXES and isinstance(value, str):
        return {"name": value}
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "params.r=4"]`` -> nested dict; values are parsed as YAML scalars.

    Order does not matter: ``params=lora params.r=4`` and ``params.r=4 params=lora`` both give
    ``{params: {name: lora, r: 4}}``; of two values for one key the later wins.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise SlimtuneError(f"override {item!r}: expected key=value (e.g. train.steps=10)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            node[part] = _as_spec(part, node.get(part, {})) if depth == 0 else node.get(part, {})
            node = node[part]
            if not isinstance(node, dict):
                raise SlimtuneError(
                    f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section"
                )
        last = parts[-1]
        value = _as_spec(last, value) if len(parts) == 1 else value
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            value = merge(node[last], value)
        node[last] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, section by section. A method axis that names another method
    starts afresh: the options of the method it replaces do not apply to it."""
    out = dict(base)
    for key, value in extra.items():
        if key in registry.AXES:
            old, value = _as_spec(key, out.get(key)), _as_spec(key, value)
            if (
                isinstance(old, dict)
                and isinstance(value, dict)
                and "name" in value
                and old.get("name") != value["name"]
            ):
                old = {}
            out[key] = old
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"recipe {str(path)!r}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise SlimtuneError(
            f"recipe {str(path)!r} line {line}: not UTF-8 text (byte {e.start})"
        ) from None
    except OSError as e:
        raise SlimtuneError(f"recipe {str(path)!r}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise SlimtuneError(f"recipe {str(path)!r}{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SlimtuneError(f"recipe {str(path)!r}: the top level must be a mapping")
    return data


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe file (optional), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(merge(data, parse_overrides(overrides or [])))


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
