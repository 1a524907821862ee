"""`kk quantize`: a full-weight run (``kk merge --unload``'s) in GPTQ 8/4-bit, as the LMSYS 1st place shipped it.

GPTQ (Frantar et al. 2022, blocked) is solved here on the run's training rows, layer groups in order; saved in
compressed-tensors' ``pack-quantized`` format: a pure-Python wheel (the kernel carries it) that transformers loads (the
HF engine decompresses it to fp16; the CPU tests) and vLLM serves with Marlin kernels on a T4 (vllm PRs #29901, #31000).
llmcompressor (whose GPTQ this mirrors) pins transformers<=5.17; gptqmodel and auto-gptq are CUDA source builds."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from .errors import KKError

HESSIAN_BYTES = 4 * 1024**3  # one calibration pass collects this much of the layers' X^T X


def gptq_bits(fold_path) -> int | None:
    """The weight bits of a ``kk quantize`` fold (its config.json), else None."""
    try:
        q = json.loads((Path(fold_path) / "config.json").read_text())["quantization_config"]
        return int(next(iter(q["config_groups"].values()))["weights"]["num_bits"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration, AttributeError):
        return None


def gptq(w, h, bits: int, group: int, damp: float = 0.01):
    """(W rounded to a symmetric ``bits`` grid, dequantized; scales (out, in / group)) for W (out, in) and H = X^T X / n:
    each column's rounding error is spread over the columns not yet rounded through the inverse Hessian."""
    import torch

    w, h = w.float().clone(), h.clone()
    dead = h.diagonal() == 0
    h[dead, dead], w[:, dead] = 1, 0
    h += damp * h.diagonal().mean() * torch.eye(len(h), device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmax, q, scales = 2 ** (bits - 1) - 1, torch.empty_like(w), []
    for b in range(0, w.shape[1], group):
        e = min(b + group, w.shape[1])
        scales.append(s := (w[:, b:e].abs().amax(1) / (qmax + 0.5)).clamp(min=1e-10))  # compressed-tensors' scale
        err = torch.zeros_like(w[:, b:e])
        for i in range(b, e):
            q[:, i] = (w[:, i] / s).round().clamp(-qmax - 1, qmax) * s
            err[:, i - b] = (w[:, i] - q[:, i]) / u[i, i]
            w[:, i:e] -= err[:, i - b, None] * u[i, i:e]
        w[:, e:] -= err @ u[b:e, e:]
    return q, torch.stack(scales, 1)


def quantize_run(run_dir, out, bits: int = 8, rows: int = 128, length: int = 2100, group: int = 128, force: bool = False) -> Path:
    """Every fold of ``run_dir`` (full weights) GPTQ-quantized into ``out``, calibrated on ``rows`` training rows of at
    most ``length`` tokens under its formatter (defaults: the LMSYS 1st place's 128 x 2,100, group size 128)."""
    import numpy as np
    import torch

    from .data import load_train
    from .engine import HFEngine
    from .formatting import Formatter
    from .io import atomic_dir, claim_output_dir, mark_output_dir, write_json
    from .runs import open_run
    from .ui import progress
    from .versions import library_versions

    if bits not in (4, 8):
        raise KKError(f"--bits must be 8 or 4 (got {bits})")
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
        from loguru import logger
    except ImportError:
        raise KKError("kk quantize needs compressed-tensors (pip install compressed-tensors)") from None
    logger.disable("compressed_tensors")  # its per-module notices
    claim_output_dir(out, force, "quantize", sources=[run_dir])
    run = open_run(run_dir)
    for f in run.folds:
        if why := ("is a LoRA adapter: quantize kk merge --unload's plain model" if f.adapter else "is already quantized" if gptq_bits(f.path)
                   else f"was trained over a {f.cfg.model.quantization} bitsandbytes base: merge into the fp16 base (peft #2321), then quantize"
                   if f.cfg.model.quantization != "none" else None):
            raise KKError(f"{f.path} {why}")
    with atomic_dir(out) as tmp, progress() as bar:
        mark_output_dir(tmp, "quantize")
        for f in run.folds:
            eng = HFEngine([f])
            model, cfg = eng.model, eng.config(f)
            fmt = Formatter.from_config(eng.formatter(f).tokenizer, cfg.inference_model().model_copy(update={"max_length": length}))
            df, _ = load_train(cfg.data.train, cfg.data.bad_rows, run.task)
            seqs, _ = fmt.sequences(fmt.encode_rows(df.sample(min(rows, len(df)), random_state=cfg.seed)))
            lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            targets = {n: m for n, m in lin.items() if n.split(".")[0] not in ("score", "classifier", "pooler")}
            if bad := next((n for n, m in targets.items() if m.in_features % group), None):
                raise KKError(f"--group-size {group} does not divide the {targets[bad].in_features} input columns of {bad}")
            left, task = list(targets.values()), bar.add_task(f"GPTQ {bits}-bit {f.path.name}", total=len(targets))
            while left:  # later layers are calibrated on the already quantized earlier ones
                chunk = [left.pop(0)]
                while left and 4 * sum(m.in_features**2 for m in chunk + left[:1]) <= HESSIAN_BYTES:
                    chunk.append(left.pop(0))
                hs = {m: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for m in chunk}
                def add_xtx(m, a, hs=hs):  # the layer's X^T X over every calibration token
                    hs[m].addmm_((x := a[0].flatten(0, -2).float()).T, x)
                hooks = [m.register_forward_pre_hook(add_xtx) for m in chunk]
                with torch.no_grad():
                    for s in seqs:
                        model(input_ids=torch.as_tensor(np.asarray(s)[None], device=eng.device))
                for hk in hooks:
                    hk.remove()
                for m in chunk:
                    qw, m.kk_scale = gptq(m.weight.data, hs.pop(m) / len(seqs), bits, group)
                    m.weight.data = qw.to(m.weight.dtype)
                bar.advance(task, len(chunk))
            scheme = preset_name_to_scheme(f"W{bits}A16", ["Linear"])
            scheme.weights.group_size = group
            apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, quantization_status="frozen",
                                                                ignore=[n for n in lin if n not in targets]), show_progress=False)
            for m in targets.values():
                m.weight_scale.data = m.kk_scale.to(m.weight_scale.dtype)
            (compressor := ModelCompressor.from_pretrained_model(model, "pack-quantized")).compress_model(model)
            shutil.copytree(f.path, dst := tmp / f.path.name, ignore=shutil.ignore_patterns("model*.safetensors*", "config.json"))
            model.save_pretrained(dst)
            compressor.update_config(str(dst))
            eng.close()
            write_json(dst / "metrics.json", {**f.metrics, "generation": uuid.uuid4().hex, "versions": library_versions(), "quantized": {
                "bits": bits, "group_size": group, "calibration_rows": len(seqs), "mean_tokens": int(np.mean([len(s) for s in seqs]))}})
    return Path(out)
