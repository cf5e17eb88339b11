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


# --- real-checkpoint variants the tiny fixtures do not show by themselves (review of issue 11) -----------------
def _logits(d, ids):
    import jax.numpy as jnp

    model, _ = load_pretrained(d)
    return np.asarray(model(jnp.asarray(ids))[0])


def test_tied_config_with_a_distinct_lm_head_is_untied_as_transformers_does(llama_dir):
    """A merged checkpoint may keep tie_word_embeddings=true yet store its own lm_head.weight: transformers
    then uses the stored head, and so must we (identical heads stay tied)."""
    ref = np.load(FIXTURES / "llama" / "reference.npz")
    head = np.random.default_rng(0).normal(size=(400, 32)).astype(np.float32)
    _rewrite_tensors(llama_dir, lambda t: t.__setitem__("lm_head.weight", head))
    model, _ = load_pretrained(llama_dir)
    assert not model.cfg.tie_embeddings
    _, hidden = model(ref["input_ids"])
    np.testing.assert_allclose(np.asarray(model(ref["input_ids"])[0]), np.asarray(hidden) @ head.T, atol=1e-4)
    _rewrite_tensors(llama_dir, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    assert load_pretrained(llama_dir)[0].cfg.tie_embeddings
    np.testing.assert_allclose(_logits(llama_dir, ref["input_ids"]), ref["logits"], atol=2e-4)


def test_original_gpt2_names_buffers_and_bfloat16_file(tmp_path):
    """The original gpt2 files: no 'transformer.' prefix, causal-mask buffers (attn.bias, attn.masked_bias),
    bfloat16 tensors (read through ml_dtypes); and n_inner null means 4·n_embd."""
    gpt2 = json.loads((FIXTURES / "gpt2" / "config.json").read_text())
    assert config_from_hf({**gpt2, "n_inner": None}).d_ff == 4 * gpt2["n_embd"]
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "gpt2"
    shutil.copytree(FIXTURES / "gpt2", d)
    ref = np.load(FIXTURES / "gpt2" / "reference.npz")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(d / "model.safetensors")).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    tensors["h.1.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    save_file({k: v.astype(ml_dtypes.bfloat16) if v.ndim else v for k, v in tensors.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    logits = _logits(d, ref["input_ids"])
    # bfloat16-rounded weights, float32 compute: ≈ 2^-8 relative per weight; bound as in the bf16 test
    assert np.abs(logits - ref["logits"]).max() < 0.05 * np.abs(ref["logits"]).max()


def test_export_keeps_the_activation(tmp_path):
    import jax.numpy as jnp

    from models.hf import save_pretrained

    d = tmp_path / "gelu"
    shutil.copytree(FIXTURES / "gpt2", d)
    _edit_config(d, activation_function="gelu")
    model, tok = load_pretrained(d)
    save_pretrained(model, tok, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["activation_function"] == "gelu"
    ids = jnp.asarray(np.load(FIXTURES / "gpt2" / "reference.npz")["input_ids"])
    np.testing.assert_allclose(_logits(tmp_path / "again", ids), np.asarray(model(ids)[0]), atol=1e-5)


def test_malformed_files_and_settings_are_value_errors(llama_dir, tmp_path):
    (llama_dir / "tokenizer_config.json").unlink()
    (llama_dir / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json must hold a JSON object"):
        load_pretrained(llama_dir)
    with pytest.raises(ValueError, match="dtype=5 is not supported"):
        load_pretrained(FIXTURES / "gpt2", dtype=5)
    d = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "llama_sharded", d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": 3}}))
    with pytest.raises(ValueError, match="'weight_map' must map tensor names to shard file names"):
        load_pretrained(d)


@pytest.mark.parametrize("changes,match", [
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 16.0}, rope_scaling={"type": "linear", "factor": 2.0}),
     "RoPE scaling 'linear'"),  # a legacy rope_scaling replaces rope_parameters' scaling, as in transformers
    (dict(attention_types=[["global", "local"]]), "attention_types must be"),
])
def test_rope_and_attention_layouts(llama_dir, changes, match):
    if "attention_types" in changes:
        llama_dir = llama_dir.parent / "neo"
        shutil.copytree(FIXTURES / "gpt_neo", llama_dir)
    _edit_config(llama_dir, **changes)
    with pytest.raises(ValueError, match=match):
        load_pretrained(llama_dir)


def test_llama3_original_context_falls_back_to_max_positions():
    cfg = config_from_hf(dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                              intermediate_size=16, max_position_embeddings=32, vocab_size=10,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "rope_theta": 16.0}))
    assert dict(cfg.rope_scaling)["original_max_position_embeddings"] == 32.0
    # the fixture's frequencies, as transformers 5.24 computed them (tests/fixtures/hf/llama/reference.json)
    want = json.loads((FIXTURES / "llama" / "reference.json").read_text())["rope_inv_freq"]
    np.testing.assert_array_equal(cfg.rope_inverse_frequencies(), np.float32(want))
