from __future__ import annotations

import pytest
import yaml

from conftest import REPO, run_cli
from kagglekit.config import Config, describe_fields, load_config
from kagglekit.errors import ConfigError

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem  # the default run folder is named after the file


def test_deberta_preset_has_the_seed_settings():
    cfg = load_config(REPO / "configs" / "deberta-v3-base.yaml")
    assert cfg.model.backbone == "microsoft/deberta-v3-base"
    assert cfg.model.max_length == 1280
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.1)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (5, 2, 16)
    assert cfg.train.lr == 2e-5 and cfg.train.scheduler == "cosine"
    # the seed's 0.1 smoothing measured worse on log loss (benchmarks/RESULTS.md): the preset follows the measurement
    assert cfg.train.label_smoothing == 0.0 and cfg.train.patience == 3
    assert cfg.seed == 42 and cfg.train.swap_augment is True


def test_overrides_are_yaml_scalars():
    cfg = load_config(None, ["train.lr=1e-4", "lora.enabled=false", "model.backbone=/path/to/model", "train.epochs=2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.enabled is False
    assert cfg.model.backbone == "/path/to/model"
    assert cfg.train.epochs == 2


def test_tune_override_takes_a_dotted_key():
    cfg = load_config(None, ["tune.train.lr={low: 1.0e-5, high: 1.0e-3, log: true}"])
    assert cfg.tune["train.lr"].log is True


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lerning_rate=1", "train.lerning_rate is not a field (did you mean train.lr?)"),
        ("train.learning_rate=1", "did you mean train.lr?"),
        ("trian.lr=1", "trian is not a field (did you mean train?)"),
        ("model.backbon=x", "did you mean model.backbone?"),
        ("train.lr=abc", "train.lr"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("model.truncation=middle", "model.truncation"),
        ("tune.train.lrr={low: 1, high: 2}", "train.lrr is not a field (did you mean train.lr?)"),
        ("tune.train.lr={low: 3, high: 2}", "low 3.0 is above high 2.0"),
        ("no_equals_sign", "expected key.path=value"),
    ],
)
def test_bad_config_names_the_key(override, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert expected in str(exc.value)
    assert str(exc.value).startswith("config error:")


def test_typo_in_file_is_reported_with_file_name(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: train.lerning_rate is not a field \(did you mean train.lr\?\)"):
        load_config(p)


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    rows = describe_fields()
    assert len(rows) > 30
    undocumented = [k for k, _, doc in rows if not doc]
    assert not undocumented


def test_resolved_config_round_trips():
    cfg = load_config(None, ["train.lr=3e-4", "name=x"])
    again = Config.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_cli_config_error_is_one_line(tmp_path):
    r = run_cli("config", "--set", "train.lerning_rate=1")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == ["error: config error: --set train.lerning_rate is not a field (did you mean train.lr?)"]
    assert "Traceback" not in r.output


# --- the presets of the models that win (issue 20) ---------------------------------------------------------------------

def _deberta_v3_base():
    from transformers import DebertaV2Config

    return DebertaV2Config(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=512, relative_attention=True, position_buckets=256,
                           norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                           max_relative_positions=-1, type_vocab_size=0)


def _gemma2_9b():
    from transformers import Gemma2Config

    return Gemma2Config(hidden_size=3584, num_hidden_layers=42, intermediate_size=14336, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=256, vocab_size=256000)


def _llama31_8b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def _qwen25_7b():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


def _qwen25_14b():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=5120, num_hidden_layers=48, intermediate_size=13824, num_attention_heads=40,
                       num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)


def _llama31_70b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


# Each hub backbone a preset names: its real dimensions (the published config.json, written here: no download) and
# the published parameter count of the released model (model cards: 9.24B, 8.03B, 7.62B, 14.77B, 70.55B, DeBERTa-v3-base 184M),
# less its LM head where that is a separate matrix (the classification head replaces it).
ARCHITECTURES = {
    "microsoft/deberta-v3-base": (_deberta_v3_base, 184e6, 0),
    "google/gemma-2-9b-it": (_gemma2_9b, 9.24e9, 0),  # tied embeddings: no separate LM head
    "meta-llama/Meta-Llama-3.1-8B-Instruct": (_llama31_8b, 8.03e9, 128256 * 4096),
    "Qwen/Qwen2.5-7B-Instruct": (_qwen25_7b, 7.62e9, 152064 * 3584),
    "Qwen/Qwen2.5-14B-Instruct": (_qwen25_14b, 14.77e9, 152064 * 5120),
    "meta-llama/Llama-3.1-70B-Instruct": (_llama31_70b, 70.55e9, 128256 * 8192),
}
HUB_PRESETS = [p for p in PRESETS if not load_config(p).model.backbone.startswith(("/", ".", "models/", "pkg:"))
               and "/" in load_config(p).model.backbone]


def test_every_hub_preset_has_its_architecture_here():
    assert {p.name for p in HUB_PRESETS} >= {"deberta-v3-base.yaml", "gemma2-9b-qlora.yaml", "llama31-8b-qlora.yaml"}
    missing = [p.name for p in HUB_PRESETS if load_config(p).model.backbone not in ARCHITECTURES]
    assert not missing, f"add the real dimensions of these presets' backbones to ARCHITECTURES: {missing}"


@pytest.mark.parametrize("path", HUB_PRESETS, ids=[p.name for p in HUB_PRESETS])
def test_preset_architecture_builds_on_meta_with_its_lora_targets(path):
    """The preset's backbone at its real size, on the meta device (no weights, no memory): the parameter count is
    the published one, and every LoRA target of the preset names Linear layers of that architecture, in every layer."""
    import torch
    from peft import LoraConfig, TaskType
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoModelForSequenceClassification

    from kagglekit.modeling import DEFAULT_TARGETS, head_modules

    cfg = load_config(path)
    make, published, lm_head = ARCHITECTURES[cfg.model.backbone]
    conf = make()
    conf.num_labels = 3
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(conf)
    n = sum(p.numel() for p in model.parameters())
    expected = published - lm_head
    assert abs(n - expected) / expected < 0.01, f"{n / 1e9:.3f}B parameters, expected about {expected / 1e9:.3f}B"
    targets = cfg.lora.target_modules or DEFAULT_TARGETS[conf.model_type]
    heads = head_modules(model)
    # one target at a time (a regex string, as DEFAULT_TARGETS has for encoders, is one target), matched as peft does
    for target in [targets] if isinstance(targets, str) else [[t] for t in targets]:
        pconf = LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=target, modules_to_save=heads)
        hits = [m for key, m in model.named_modules() if key and check_target_module_exists(pconf, key)]
        assert hits and all(isinstance(m, torch.nn.Linear) for m in hits), target
        assert len(hits) % conf.num_hidden_layers == 0  # the same modules in every layer, none elsewhere
    if cfg.model.quantization != "none":
        assert cfg.model.gradient_checkpointing


@pytest.mark.parametrize("name", ["gemma2-9b-qlora", "llama31-8b-qlora"])
def test_llm_presets_hold_the_published_recipe(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert (cfg.lora.r, cfg.lora.alpha) == (64, 16)
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (1e-4, 1, 4, 2)
    assert cfg.model.max_length == 1800 and cfg.predict.max_length == 8192
    assert cfg.inference_model().max_length == 8192 and cfg.inference_model().quantization == "4bit"
    assert cfg.model.quantization == "4bit" and cfg.model.gradient_checkpointing and cfg.model.layout == "rounds"
    assert cfg.train.swap_augment and cfg.train.swap_same_batch and cfg.train.max_tokens == 4 * 1800
    assert cfg.train.label_smoothing == 0.0
    assert cfg.lora.dropout == (0.05 if name.startswith("gemma") else 0.0)


def test_predict_overrides_touch_only_the_predict_section():
    from kagglekit.config import apply_predict_overrides

    cfg = load_config(None, ["model.max_length=128", "model.quantization=4bit"])
    assert cfg.inference_model() == cfg.model  # nothing set: inference as trained
    out = apply_predict_overrides(cfg, ["predict.max_length=256", "predict.quantization=8bit", "predict.precision=fp32"])
    m = out.inference_model()
    assert (m.max_length, m.quantization, m.precision) == (256, "8bit", "fp32")
    assert out.model == cfg.model and cfg.predict.max_length is None  # the trained settings are untouched
    with pytest.raises(ConfigError, match=r"^config error: --set model.max_length=64: kk predict takes only predict\.\* keys"):
        apply_predict_overrides(cfg, ["model.max_length=64"])
    with pytest.raises(ConfigError, match="did you mean predict.quantization"):
        apply_predict_overrides(cfg, ["predict.quantisation=8bit"])
    with pytest.raises(ConfigError, match="predict.quantization"):
        apply_predict_overrides(cfg, ["predict.quantization=2bit"])


def test_pair_pooling_needs_the_blocks_layout():
    with pytest.raises(ConfigError, match="pooling=pair reads one block per response: use layout=blocks"):
        load_config(None, ["model.pooling=pair", "model.layout=rounds"])
