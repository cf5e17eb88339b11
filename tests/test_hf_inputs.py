"""Hugging Face tokenizer against transformers' recorded outputs, and one clear ValueError for every bad
checkpoint, config or setting (issue 11)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.hf import HFTokenizer, config_from_hf, load_pretrained
from models.lm.program import LMProgram

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
REF = json.loads((FIXTURES / "tokenizer" / "reference.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return HFTokenizer.from_dir(FIXTURES / "tokenizer")


# --- tokenizer ------------------------------------------------------------------------------------------------
def test_special_tokens(tok):
    assert tok.vocab_size == REF["vocab_size"]
    assert (tok.bos_id, tok.pad_id) == (REF["bos_token_id"], REF["pad_token_id"])
    assert tok.eos_ids[0] == REF["eos_token_id"]
    assert tok.special_ids == sorted(REF["special_token_ids"].values())


@pytest.mark.parametrize("case", REF["cases"], ids=lambda c: repr(c["text"])[:24])
def test_encode_decode_as_transformers(tok, case):
    assert tok.encode(case["text"]) == case["input_ids"]
    assert tok.encode(case["text"], add_special_tokens=False) == case["input_ids_no_special"]
    assert tok.decode(case["input_ids"], skip_special_tokens=False) == case["decode"]
    assert tok.decode(case["input_ids"]) == case["decode_skip_special"]


@pytest.mark.parametrize("case", REF["incremental_decode"], ids=lambda c: repr(c["text"])[:24])
def test_incremental_decoding_holds_back_partial_characters(tok, case):
    """transformers' decode of a prefix ending inside a multi-byte character shows U+FFFD; the incremental
    decoder shows the complete characters only, and ends on the full text."""
    ids, want = case["input_ids"], case["prefix_decodes"]
    for k in range(len(ids) + 1):
        assert tok.decode(ids[:k]) == want[k]
    steps = tok.decode_incremental(ids)
    assert len(steps) == len(ids) and steps[-1] == want[-1]
    partial = 0
    for k, text in enumerate(steps, start=1):
        assert "\ufffd" not in text
        assert want[k].startswith(text) and want[k].rstrip("\ufffd").startswith(text)
        partial += want[k].endswith("\ufffd")
    assert partial > 0  # the case really splits a character


@pytest.mark.parametrize("name", sorted(REF["chat_template"]))
def test_chat_template_as_transformers(tok, name):
    case = REF["chat_template"][name]
    text = tok.apply_chat_template(case["messages"], add_generation_prompt=True)
    assert text == case["text"]
    assert tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=True) == case["input_ids"]
    assert tok.apply_chat_template(case["messages"]) == case["text_no_generation_prompt"]


def test_tokenizer_bad_input(tok, tmp_path):
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="no tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)


# --- bad checkpoints --------------------------------------------------------------------------------------------
@pytest.fixture
def llama_dir(tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(FIXTURES / "llama", d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(d, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_files(tmp_path, llama_dir):
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(tmp_path)
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_pretrained(llama_dir)


def test_missing_shard(tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "llama_sharded", d)
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="shard.*missing"):
        load_pretrained(d)


def test_corrupt_files(llama_dir):
    (llama_dir / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_pretrained(llama_dir)


def test_corrupt_weights(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_pretrained(llama_dir)


def test_missing_and_unexpected_tensors_are_listed(llama_dir):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)

    _rewrite_tensors(llama_dir, edit)
    with pytest.raises(ValueError, match=r"missing tensors: model.layers.1.mlp.up_proj.weight.*"
                                         r"unexpected tensors: model.layers.1.mlp.extra.weight"):
        load_pretrained(llama_dir)


def test_shape_disagreeing_with_config(llama_dir):
    _edit_config(llama_dir, intermediate_size=24)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight .* has shape \[16, 32\] but "
                                         r"config.json implies \[24, 32\]"):
        load_pretrained(llama_dir)


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="mamba"), "model_type 'mamba' is not supported; supported: .*gpt2"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 16.0}), "RoPE scaling 'yarn'"),
    (dict(use_sliding_window=True), "use_sliding_window=True"),
    (dict(num_local_experts=8), "num_local_experts=8"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "only 'full_attention'"),
    (dict(hidden_act="gelu_fast"), "activation 'gelu_fast' is not supported"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
])
def test_unsupported_architecture_or_feature(llama_dir, changes, match):
    _edit_config(llama_dir, **changes)
    with pytest.raises(ValueError, match=match):
        load_pretrained(llama_dir)


def test_tokenizer_ids_beyond_embedding(llama_dir):
    _edit_config(llama_dir, vocab_size=300)

    def edit(t):
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:300]

    _rewrite_tensors(llama_dir, edit)
    with pytest.raises(ValueError, match="beyond the model's embedding of 300 rows"):
        load_pretrained(llama_dir)


def test_prompt_plus_steps_beyond_max_positions():
    model, tok = load_pretrained(FIXTURES / "gpt_neo")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LMProgram.from_prompt(model, "The little fox", model.cfg.max_len, tokenizer=tok)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        load_pretrained(FIXTURES / "gpt2", dtype="int8")
    with pytest.raises(ValueError, match="cache_dtype='float8' is not supported"):
        load_pretrained(FIXTURES / "gpt2", cache_dtype="float8")


def test_hub_name_offline_says_how_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"hf download nobody/no-such-model --local-dir"):
        load_pretrained("nobody/no-such-model")


def test_config_parsing_of_real_configs():
    """The published configs of the models the issue names parse to the right switches (no download: the
    fields are those of their config.json files)."""
    llama32 = dict(model_type="llama", hidden_size=2048, num_attention_heads=32, num_hidden_layers=16,
                   num_key_value_heads=8, head_dim=64, intermediate_size=8192, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, vocab_size=128256,
                   rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                   attention_bias=False, mlp_bias=False, pretraining_tp=1, hidden_act="silu")
    cfg = config_from_hf(llama32)
    assert (cfg.kv_dim, cfg.tie_embeddings, dict(cfg.rope_scaling)["factor"]) == (512, True, 32.0)
    inv = cfg.rope_inverse_frequencies()
    assert inv[0] == 1.0 and np.isclose(inv[-1], 500000.0 ** (-62 / 64) / 32)  # the lowest frequency is scaled
    qwen25 = dict(model_type="qwen2", hidden_size=896, num_attention_heads=14, num_hidden_layers=24,
                  num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=1e6, sliding_window=32768, use_sliding_window=False, max_window_layers=24,
                  tie_word_embeddings=True, vocab_size=151936, hidden_act="silu", use_mrope=False)
    cfg = config_from_hf(qwen25)
    assert (cfg.qkv_bias, cfg.out_bias, cfg.head_dim, cfg.kv_dim) == (True, False, 64, 128)
    tinystories = dict(model_type="gpt_neo", hidden_size=768, num_heads=16, num_layers=4, max_position_embeddings=2048,
                       attention_types=[[["global", "local"], 2]], window_size=256, vocab_size=50257,
                       activation_function="gelu_new", layer_norm_epsilon=1e-5, intermediate_size=None)
    cfg = config_from_hf(tinystories)
    assert cfg.layer_kinds == ("global", "local", "global", "local") and not cfg.scale_attention and cfg.d_ff == 3072
