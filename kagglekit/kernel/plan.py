"""Where each run's model goes on Kaggle's GPUs, and how long the kernel will take.

Runs on the user's machine (``kk kernel`` prints the plan) AND on Kaggle (the notebook checks it again against the
GPUs it has before loading anything); imports nothing from build, dryrun or push. Placement per run, on the meta
device from the backbone's config: ``per_gpu`` (a copy on each GPU, each on half the rows), ``split`` (one model
over both T4s by accelerate's device map) or ``refused`` (the reason names the fix). Hours: FLOPs of the rows' real
token counts over a T4's sustained throughput at the run's precision (:data:`THROUGHPUT`, each factor cited).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KKError

GIB = 1024**3
# One T4 as Kaggle's "GPU T4 x2" shows it: 15,360 MiB, less what the CUDA context keeps.
T4_BYTES = int(14.5 * GIB)
# What must stay free beside the weights: activations of a useful batch (predict.max_tokens: auto fills
# whatever is left), the allocator's slack, LoRA adapters.
ACTIVATION_RESERVE = int(1.5 * GIB)
# GPUs per Kaggle accelerator (kernel-metadata.json's machine_shape) and the usable bytes of each.
MACHINES = {"NvidiaTeslaT4": (2, T4_BYTES), "NvidiaTeslaT4Highmem": (2, T4_BYTES), "NvidiaL4": (1, int(21.5 * GIB))}

# --- throughput: how fast one T4 runs this work ---------------------------------------------------------------------
# The kernel's work is prefill only (one forward pass per row, length-sorted batches, no generation), so
# it is compute-bound: hours = FLOPs / (peak x utilisation x factor).
T4_PEAK_TFLOPS = 65.0  # NVIDIA T4 datasheet: 65 TFLOP/s fp16 (tensor cores, dense)
# fp16 utilisation: an ASSUMPTION (no published measurement of prefill-only classification on a T4 was
# found), checked against the one published end-to-end number below and measured by
# benchmarks/bench_quant.py (gpu_check.sh) the first time a GPU runs it.
T4_FP16_UTILISATION = 0.35
# Throughput relative to fp16 on a T4, per weight format, from bitsandbytes' own published benchmark
# (bitsandbytes-foundation/bitsandbytes, benchmarking/README.md, "NVIDIA T4 16GB", Qwen 2.5 3B,
# bitsandbytes 0.45, batch 32 tokens/s: FP16 532.30, NF4+DQ 263.36, INT8+Decomp 167.37):
#   4bit: NF4 with double quantization (what model.quantization: 4bit loads)   263.36 / 532.30 = 0.49
#   8bit: LLM.int8 with outlier decomposition (transformers' default threshold 6.0) 167.37 / 532.30 = 0.31
# Those are decode batches; a second published T4 measurement of batched classification (earino,
# "Your int8 Quantization Is 2.5x Slower Than fp16", Kaggle T4, a 494M decoder: fp16 5.05, int4 7.92,
# int8 12.65 ms/example) gives 0.64 and 0.40: the table keeps the slower factors, a kernel that ends
# early loses nothing. Cross-check of the whole chain: Kaggle LMSYS participants report 3-4 h for one
# Gemma-2-9B in 4-bit with fp16 compute on 2 x T4 over the ~25,000 hidden rows (discussion "Gemma2 9b's
# inference time is much longer than Llama3 8b", July 2024); this table gives 3.7 h at ~700 tokens a row.
# fp32 master weights (small models) still compute in fp16 under autocast: factor 1.
# gptq8/gptq4: kk quantize's runs under predict.engine: vllm (the HF engine decompresses them to fp16: factor 1).
# From the WSDM Cup 7th place's Kaggle T4 timings per 512 rows (discussion 567589): Qwen2.5-14B fp16 at 3072 tokens
# 10.5 min; Mistral-24B GPTQ at 2048 16.4 min, Qwen2.5-32B GPTQ at 2048 20.0 min: FLOPs (2 x params x tokens) per
# minute relative to the fp16 model 0.73 and 0.80. Their bits are not stated (32B fits 2 x T4 only at <= 4 bits);
# 8-bit takes the slower 0.73 too until benchmarks/gpu_check.sh measures it.
THROUGHPUT = {"fp16": 1.0, "fp32": 1.0, "8bit": 0.31, "4bit": 0.49, "gptq8": 0.73, "gptq4": 0.73}


@dataclass
class Placement:
    """Where one run's model goes (see the module docstring)."""

    kind: str  # per_gpu | split | refused | cpu | unknown
    params: int = 0
    weights: str = ""  # 4bit | 8bit | fp16 | fp32: the format the weights are loaded in
    weight_bytes: int = 0
    gpus: int = 0
    gpu_bytes: int = 0
    device_map: dict | None = None
    reason: str = ""
    layers: int = 0
    hidden: int = 0
    embed_params: int = 0
    devices_used: list = field(default_factory=list)

    def describe(self) -> str:
        params = f"{self.params / 1e9:.1f}B" if self.params >= 1e9 else f"{self.params / 1e6:.1f}M"
        size = f"{params} params, {self.weights} ~{_bytes(self.weight_bytes)}"
        if self.kind == "per_gpu":
            return f"a copy per GPU, rows split ({size}; {_bytes(self.gpu_bytes)} a GPU)"
        if self.kind == "split":
            return f"split over {len(self.devices_used)} GPUs, folds in turn ({size})"
        if self.kind == "refused":
            return f"REFUSED: {self.reason}"
        if self.kind == "cpu":
            return f"CPU ({size})"
        return self.reason or "unknown"


def _bytes(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def meta_model(config_or_path, num_labels: int):
    """The sequence classifier of a backbone config, built on the meta device (accelerate's
    ``init_empty_weights``): shapes and module names, no memory, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..modeling import no_remote_code

    conf = config_or_path
    if not hasattr(conf, "model_type"):
        try:
            conf = AutoConfig.from_pretrained(str(config_or_path), **no_remote_code(config_or_path))
        except (OSError, ValueError, KeyError) as e:
            raise KKError(f"cannot read the backbone config in {config_or_path}: {str(e).splitlines()[0]}") from None
    conf.num_labels = num_labels
    with init_empty_weights():
        return AutoModelForSequenceClassification.from_config(conf)


def weight_format(params: int, quantization: str) -> str:
    """The format inference loads the weights in on a T4: the quantization, else fp32 master weights for
    small models and fp16 above modeling.FP32_INFERENCE_MAX_BYTES (what inference_weight_dtype does)."""
    from ..modeling import FP32_INFERENCE_MAX_BYTES

    if quantization in ("4bit", "8bit", "gptq8", "gptq4"):
        return quantization
    return "fp32" if 4 * params <= FP32_INFERENCE_MAX_BYTES else "fp16"


def _param_dtypes(model, weights: str) -> dict:
    """Per parameter name, the dtype it takes in memory: bitsandbytes quantizes the weight of every
    nn.Linear except the heads (modeling.HEAD_MODULES, kept out of quantization); embeddings, norms,
    biases and heads stay in half precision."""
    import torch
    from accelerate.utils import CustomDtype

    from ..modeling import HEAD_MODULES

    half = torch.float32 if weights == "fp32" else torch.float16
    quant = {"4bit": CustomDtype.INT4, "8bit": torch.int8, "gptq4": CustomDtype.INT4, "gptq8": torch.int8}.get(weights)
    out = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            is_head = any(part in HEAD_MODULES for part in mname.split("."))
            linear = isinstance(module, torch.nn.Linear) and pname == "weight"
            out[name] = quant if quant is not None and linear and not is_head else half
    return out


def inference_format(fold, overrides=None) -> str:
    """model.quantization as inference loads it, or gptq8/gptq4 for a kk quantize run that vLLM serves."""
    from ..quantize import gptq_bits

    cfg, bits = fold.inference(overrides), gptq_bits(fold.path)
    return f"gptq{bits}" if bits and cfg.predict.engine == "vllm" else cfg.inference_model().quantization


def adapter_bytes(fold_paths) -> int:
    """Memory of the folds' adapters and saved heads, all loaded beside one base (their files' size: peft
    keeps them in the dtype they were saved in, fp32 after training)."""
    total = 0
    for f in fold_paths:
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (Path(f) / name).exists():
                total += (Path(f) / name).stat().st_size
    return total


def place(config_or_path, quantization: str, gpus: int, gpu_bytes: int, num_labels: int, extra_bytes: int = 0) -> Placement:
    """Where a model goes on ``gpus`` GPUs of ``gpu_bytes`` usable bytes each (see the module docstring);
    ``extra_bytes``: what loads beside it on every GPU (the folds' adapters, :func:`adapter_bytes`)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    model = meta_model(config_or_path, num_labels)
    params = sum(p.numel() for p in model.parameters())
    weights = weight_format(params, quantization)
    dtypes = _param_dtypes(model, weights)
    total = int(compute_module_sizes(model, special_dtypes=dtypes)[""])
    conf = model.config
    embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    pl = Placement("per_gpu", params, weights, total, gpus, gpu_bytes, layers=getattr(conf, "num_hidden_layers", 0),
                   hidden=getattr(conf, "hidden_size", 0), embed_params=embed)
    if gpus == 0:
        pl.kind = "cpu"
        return pl
    room = gpu_bytes - ACTIVATION_RESERVE - extra_bytes
    if total <= room:
        pl.devices_used = [0]
        return pl
    if gpus >= 2:
        import logging

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        quiet = logging.getLogger("accelerate.utils.modeling")  # "Device 1 is not available" where it plans for Kaggle's
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            dmap = infer_auto_device_map(model, max_memory={i: room for i in range(gpus)}, no_split_module_classes=no_split,
                                         special_dtypes=dtypes)
        finally:
            quiet.setLevel(level)
        used = sorted({d for d in dmap.values() if isinstance(d, int)})
        if all(isinstance(d, int) for d in dmap.values()):
            pl.kind, pl.device_map, pl.devices_used = "split", dict(dmap), used
            return pl
    pl.kind = "refused"
    fits = f"{gpus} x {gpu_bytes / GIB:.1f} GiB GPU{'s' if gpus > 1 else ''}"
    fix = _lighter_fix(config_or_path, quantization, gpus, gpu_bytes, num_labels, extra_bytes)
    extra = f" and {_bytes(extra_bytes)} of adapters" if extra_bytes else ""
    pl.reason = (f"{params / 1e9:.1f}B parameters in {weights} need ~{total / GIB:.1f} GiB of weights{extra} plus "
                 f"{ACTIVATION_RESERVE / GIB:.1f} GiB a GPU for activations: more than {fits} hold; {fix}")
    return pl


def _lighter_fix(config_or_path, quantization: str, gpus: int, gpu_bytes: int, num_labels: int, extra_bytes: int) -> str:
    """The lightest quantization that makes the model fit, as the fix to name."""
    order = ["none", "8bit", "4bit"]
    for q in order[order.index(quantization if quantization in order else "none") + 1:]:
        if place(config_or_path, q, gpus, gpu_bytes, num_labels, extra_bytes).kind != "refused":
            return f"train it with model.quantization: {q}"
    return "use a smaller backbone (it does not fit even in 4-bit)"


def device_map_for(placement: Placement, gpu_ids: list[int] | None = None) -> dict | None:
    """The placement's device map with GPU numbers as transformers takes them (``{module: index}``)."""
    if placement.device_map is None:
        return None
    ids = gpu_ids or list(range(placement.gpus))
    return {k: ids[v] if isinstance(v, int) else v for k, v in placement.device_map.items()}


# --- the time estimate ----------------------------------------------------------------------------------------------


def flops_per_row(placement: Placement, lengths) -> float:
    """Mean FLOPs of one forward pass of a row: 2 x non-embedding parameters per token, plus attention
    (4 x layers x hidden x length^2)."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.float64)
    if not len(lengths):
        return 0.0
    body = placement.params - placement.embed_params
    return float(np.mean(2 * body * lengths + 4 * placement.layers * placement.hidden * lengths**2))


def t4_flops_per_s(weights: str) -> float:
    """Sustained FLOP/s of one T4 for this work at a weight format (see :data:`THROUGHPUT`)."""
    return T4_PEAK_TFLOPS * 1e12 * T4_FP16_UTILISATION * THROUGHPUT.get(weights, 1.0)


def run_hours(placement: Placement, lengths, rows: int, folds: int, second_share: float) -> dict:
    """Hours for one run: ``rows`` x ``folds`` x (1 + ``second_share``) passes on Kaggle's GPUs.

    A copy per GPU splits the rows between the GPUs; a split model uses its GPUs one after another (a
    pipeline of one batch), so it runs at one GPU's speed."""
    per_fold_pass = rows * flops_per_row(placement, lengths) / t4_flops_per_s(placement.weights) / 3600
    parallel = max(1, placement.gpus) if placement.kind == "per_gpu" else 1
    first = per_fold_pass * folds / parallel
    return {"pass1_h": first, "pass2_h": first * second_share, "total_h": first * (1 + second_share),
            "passes": 1 + second_share, "gpus_busy": parallel}


def estimate_run(folds: list, backbone_conf, machine_shape: str, rows_source=None, overrides: list[str] | None = None,
                 tta=None, tta_share: float | None = None, rows: int | None = None) -> dict:
    """One run's plan on a Kaggle machine: where its model goes (:func:`place`, at the inference settings), the mean
    tokens of its rows under its formatter, and the hours and FLOPs of ``rows`` (default: the hidden test's) x folds x
    passes. ``backbone_conf``: a config.json folder or a config; None (attached from Kaggle): no placement or hours.
    The one estimate of ``kk kernel --plan`` and of the dry run."""
    from ..tta import second_pass_share, tta_mode
    from .common import HIDDEN_TEST_ROWS

    rows = rows or HIDDEN_TEST_ROWS
    gpus, gpu_bytes = MACHINES.get(machine_shape, MACHINES["NvidiaTeslaT4"])
    cfg = folds[0].inference(overrides)
    cfg = cfg.model_copy(update={"model": cfg.inference_model()})  # predict.quantization/max_length where set
    tta = cfg.predict.tta if tta is None else tta
    share = second_pass_share(tta, cfg.predict.tta_share if tta_share is None else tta_share)
    out = {"folds": len(folds), "tta": tta_mode(tta), "share": share, "quantization": inference_format(folds[0], overrides),
           "passes": len(folds) * (1 + share), "placement": None, "tokens": None, "hours": None, "tflop": None}
    if backbone_conf is None:
        return out
    pl = place(backbone_conf, out["quantization"], gpus, gpu_bytes, folds[0].task.n_classes, adapter_bytes(f.path for f in folds))
    lengths = sample_lengths(folds[0].path, cfg, rows_source, n=len(rows_source) if hasattr(rows_source, "columns") else 2000)
    lengths = lengths or [cfg.model.max_length]
    out.update(placement=pl, tokens=float(sum(lengths) / len(lengths)))
    if pl.kind != "refused":
        out.update(hours=run_hours(pl, lengths, rows, len(folds), share), tflop=flops_per_row(pl, lengths) * rows * out["passes"] / 1e12)
    return out


def sample_lengths(fold_path: Path, cfg, rows_source=None, n: int = 2000, seed: int = 0):
    """Token lengths of up to ``n`` rows under a fold's formatter: the rows of ``rows_source`` (a frame or a
    CSV), else the run's data.test when it has more than a handful of rows, else its data.train. None when
    no file can be read (the estimate then assumes model.max_length tokens a row)."""
    from ..data import load_test
    from ..formatting import Formatter
    from ..modeling import load_tokenizer
    from ..task import get_task

    df = rows_source
    if df is None or isinstance(df, (str, Path)):
        asked, candidates = df is not None, [df] if df is not None else [cfg.data.test, cfg.data.train]
        df = None
        for path in candidates:
            try:
                got, _ = load_test(path, task=get_task(cfg.task))
            except (KKError, OSError, ValueError) as e:
                if asked:  # --rows: an estimate from rows never read would only look like one
                    raise KKError(f"--rows {path}: {str(e).splitlines()[0]}") from None
                continue
            if len(got) >= 50 or path == candidates[-1]:
                df = got
                break
    if df is None or not len(df):
        return None
    if len(df) > n:
        df = df.sample(n, random_state=seed)
    fmt = Formatter.from_config(load_tokenizer(str(fold_path)), cfg.model)
    seqs, _ = fmt.sequences(fmt.encode_rows(df))
    return [len(s) for s in seqs]
