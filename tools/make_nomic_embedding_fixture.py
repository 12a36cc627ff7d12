"""Adds a NomicBERT model (nomic-embed-text's architecture) to tests/fixtures/sentence_embeddings/:
a tiny random-weight `nomic-mean/` folder as nomic-ai publishes nomic-embed-text-v1.5 (its
`config.json` keys — `n_embd`, `rotary_emb_base`, … — and tensor names — `encoder.layers.N.attn.Wqkv`,
`mlp.fc11`/`fc12`/`fc2`, `emb_ln`), and the embeddings `SentenceTransformer.encode` gives for the
fixture's texts, under `"nomic-mean"` in `expected.json` (the other entries are left as they are).

The reference is transformers' own NomicBertModel (transformers >= 5, which reads the published
names through its conversion mapping), wrapped in sentence-transformers with mean pooling and
Normalize, as nomic-embed-text-v1.5's modules are. Rotary positions with theta 1000, SwiGLU,
post-norm layers, no biases: what `inference/src/embed/nomic.rs` implements.

Run with sentence-transformers and transformers 5 installed:
`python tools/make_nomic_embedding_fixture.py`. CI reads only the output.
"""

import json
import pathlib
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer, models
from transformers import BertTokenizerFast, NomicBertConfig, NomicBertModel

out_dir = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/sentence_embeddings"
expected_path = out_dir / "expected.json"
expected = json.loads(expected_path.read_text())
texts = expected["texts"]
# The same WordPiece vocabulary as tools/make_sentence_embedding_fixture.py.
words = ("the a cat dog sat on mat red blue fast slow runs jumps over under river city night "
         "day light dark green small big old new house tree ##s ##ed ##ing , . ! ?").split()
letters = list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + letters
# nomic pads its embedding table to a multiple of 64 rows (30522 -> 30528).
rows = (len(vocab) + 63) // 64 * 64
hidden, heads, layers, inner, positions = 32, 4, 2, 64, 64

torch.manual_seed(1)
name = "nomic-mean"
target = out_dir / name
with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"), do_lower_case=True)
    config = NomicBertConfig(vocab_size=rows, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=inner,
                             max_position_embeddings=positions, type_vocab_size=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    model = NomicBertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # Sharper attention than initial weights give, so the rotary positions (and their
        # base) move the output well past the test's tolerance.
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    model.save_pretrained(tmp / "hf")
    tok.save_pretrained(tmp / "hf")
    word = models.Transformer(str(tmp / "hf"), max_seq_length=48)
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
    if target.exists():
        shutil.rmtree(target)
    st.save(str(target))
    emb = st.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    expected[name] = emb.tolist()

    # The state dict in the published names (transformers' own, whatever save_pretrained wrote).
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

published = {
    "embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"],
    "embeddings.token_type_embeddings.weight": state["embeddings.token_type_embeddings.weight"],
    "emb_ln.weight": state["embeddings.LayerNorm.weight"],
    "emb_ln.bias": state["embeddings.LayerNorm.bias"],
}
for i in range(layers):
    src, dst = f"layers.{i}.", f"encoder.layers.{i}."
    published[dst + "attn.Wqkv.weight"] = torch.cat(
        [state[src + f"self_attn.{p}_proj.weight"] for p in "qkv"], dim=0)
    published[dst + "attn.out_proj.weight"] = state[src + "self_attn.o_proj.weight"]
    published[dst + "mlp.fc11.weight"] = state[src + "mlp.up_proj.weight"]
    published[dst + "mlp.fc12.weight"] = state[src + "mlp.gate_proj.weight"]
    published[dst + "mlp.fc2.weight"] = state[src + "mlp.down_proj.weight"]
    for a, b in [("norm1", "post_attention_layernorm"), ("norm2", "post_mlp_layernorm")]:
        published[dst + a + ".weight"] = state[src + b + ".weight"]
        published[dst + a + ".bias"] = state[src + b + ".bias"]
save_file({k: v.contiguous() for k, v in published.items()}, str(target / "model.safetensors"))

# The check that the renaming is right: transformers reads the published names back into the
# same model.
reloaded = NomicBertModel.from_pretrained(str(target)).eval()
ids = torch.tensor([tok(texts[0])["input_ids"]])
with torch.no_grad():
    a = model(ids).last_hidden_state
    b = reloaded(ids).last_hidden_state
assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()

# config.json as nomic-embed-text-v1.5 publishes it (its own NomicBertConfig, a GPT2Config),
# scaled down; `auto_map` points at code Studio never runs.
(target / "config.json").write_text(json.dumps({
    "activation_function": "swiglu",
    "architectures": ["NomicBertModel"],
    "auto_map": {"AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
                 "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel"},
    "bos_token_id": None, "causal": False, "dense_seq_output": True, "embd_pdrop": 0.0,
    "eos_token_id": None, "fused_bias_fc": True, "fused_dropout_add_ln": True,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-12, "max_trained_positions": positions,
    "mlp_fc1_bias": False, "mlp_fc2_bias": False, "model_type": "nomic_bert", "n_embd": hidden,
    "n_head": heads, "n_inner": inner, "n_layer": layers, "n_positions": positions,
    "pad_vocab_size_multiple": 64, "parallel_block": False, "parallel_block_tied_norm": False,
    "prenorm": False, "qkv_proj_bias": False, "reorder_and_upcast_attn": False, "resid_pdrop": 0.0,
    "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None, "rotary_scaling_factor": None, "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.0,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "torch_dtype": "float32", "type_vocab_size": 2, "use_cache": True, "use_flash_attn": True,
    "use_rms_norm": False, "use_xentropy": True, "vocab_size": rows,
}, indent=2) + "\n")
for extra in ["vocab.txt", "special_tokens_map.json", "README.md", "config_sentence_transformers.json"]:
    (target / extra).unlink(missing_ok=True)
expected_path.write_text(json.dumps(expected, indent=1) + "\n")
print("wrote", target, "and", expected_path.name)
