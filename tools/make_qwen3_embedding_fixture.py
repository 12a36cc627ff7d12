"""Adds a decoder embedding model (Qwen3-Embedding's architecture) to
tests/fixtures/sentence_embeddings/: a tiny random-weight `qwen3-last/` sentence-transformers folder
laid out as Qwen/Qwen3-Embedding-0.6B is (a Qwen3 decoder without an output head, tensors named
without the `model.` prefix; last-token pooling, then Normalize; a tokenizer whose post-processor
appends `<|endoftext|>`, the token whose state is the embedding), and the embeddings
`SentenceTransformer.encode` gives for the fixture's texts, under `"qwen3-last"` in `expected.json`
(the other entries are left as they are).

Run with sentence-transformers and transformers 5 installed:
`python tools/make_qwen3_embedding_fixture.py`. CI reads only the output.
"""

import json
import pathlib
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer, models
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

out_dir = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/sentence_embeddings"
expected_path = out_dir / "expected.json"
expected = json.loads(expected_path.read_text())
texts = expected["texts"]
words = ("the a cat dog sat on mat red blue fast slow runs jumps over under river city night "
         "day light dark green small big old new house tree , . ! ?").split()
specials = ["<|endoftext|>", "<unk>"]
vocab = {t: i for i, t in enumerate(specials + words)}
eos = "<|endoftext|>"

backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
backend.post_processor = processors.TemplateProcessing(
    single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])

torch.manual_seed(2)
name = "qwen3-last"
target = out_dir / name
with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos,
                                  unk_token="<unk>")
    config = Qwen3Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=64, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True)
    model = Qwen3Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # Sharper attention than initial weights give (Qwen3 normalises queries and keys per
        # head, so their norms' scales set it), so positions and causality matter.
        for layer in model.layers:
            layer.self_attn.q_norm.weight.mul_(4.0)
            layer.self_attn.k_norm.weight.mul_(4.0)
    model.save_pretrained(tmp / "hf")
    tok.save_pretrained(tmp / "hf")
    word = models.Transformer(str(tmp / "hf"), max_seq_length=48)
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="lasttoken")
    st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
    if target.exists():
        shutil.rmtree(target)
    st.save(str(target))
    emb = st.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    expected[name] = emb.tolist()
    print("tokens of the first text:", tok(texts[0])["input_ids"])

# The published layout: no `model.` prefix (what a saved Qwen3Model holds).
weights = target / "model.safetensors"
tensors = load_file(str(weights))
tensors = {k.removeprefix("model."): v.contiguous() for k, v in tensors.items()}
save_file(tensors, str(weights))
print(sorted(tensors)[:4])
for extra in ["special_tokens_map.json", "README.md", "config_sentence_transformers.json"]:
    (target / extra).unlink(missing_ok=True)
expected_path.write_text(json.dumps(expected, indent=1) + "\n")
print("wrote", target, "and", expected_path.name)
