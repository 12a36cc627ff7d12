"""Writes tests/fixtures/sentence_embeddings/: tiny random-weight sentence-transformers models (a BERT
encoder, as all-MiniLM and bge are, with a WordPiece tokenizer) saved as sentence-transformers
saves them, and the embeddings `SentenceTransformer.encode` gives for a few texts, to check
Studio's embedding models (`inference/src/embed.rs`) against them.

- `minilm-mean/`: mean pooling, then L2 normalisation (all-MiniLM's modules);
- `bge-cls/`: CLS pooling, then L2 normalisation (bge's modules), `bert.`-prefixed tensor names
  as some checkpoints have them;
- `expected.json`: the texts, and each model's embeddings.

Run with sentence-transformers installed (`pip install sentence-transformers`):
`python tools/make_sentence_embedding_fixture.py`. CI reads only the output.
"""

import json
import pathlib
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer, models
from transformers import BertConfig, BertModel, BertTokenizerFast

out_dir = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/sentence_embeddings"
out_dir.mkdir(parents=True, exist_ok=True)
words = ("the a cat dog sat on mat red blue fast slow runs jumps over under river city night "
         "day light dark green small big old new house tree ##s ##ed ##ing , . ! ?").split()
letters = list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + letters
texts = [
    "The cat sat on the mat.",
    "A dog runs over the river at night!",
    "big old house",
    "Zebras jumped quickly?",
]

torch.manual_seed(0)
expected = {"texts": texts}
for name, pooling, prefix in [("minilm-mean", "mean", False), ("bge-cls", "cls", True)]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"), do_lower_case=True)
        config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64, type_vocab_size=2)
        bert = BertModel(config, add_pooling_layer=False).eval()
        with torch.no_grad():
            for p in bert.parameters():
                p.add_(0.05 * torch.randn_like(p))
        bert.save_pretrained(tmp / "hf")
        tok.save_pretrained(tmp / "hf")
        word = models.Transformer(str(tmp / "hf"), max_seq_length=48)
        pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode=pooling)
        st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
        target = out_dir / name
        if target.exists():
            shutil.rmtree(target)
        st.save(str(target))
        emb = st.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
        expected[name] = emb.tolist()
    print(name, (target / "config_sentence_transformers.json").read_text()[:400])
    print(name, (target / "tokenizer_config.json").read_text()[:400])
    # Keep what Studio reads; drop the rest (vocab.txt is inside tokenizer.json).
    for extra in ["vocab.txt", "special_tokens_map.json", "README.md", "config_sentence_transformers.json"]:
        (target / extra).unlink(missing_ok=True)
    if name == "minilm-mean":
        # As all-MiniLM-L6-v2 is published (sentence-transformers 2.x files): the module
        # types, the pooling flags and the sequence length.
        (target / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ], indent=2))
        (target / "1_Pooling/config.json").write_text(json.dumps({
            "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
        (target / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": 48, "do_lower_case": False}, indent=2))
        (target / "2_Normalize").rmdir() if not any((target / "2_Normalize").iterdir()) else None
    if prefix:
        weights = target / "model.safetensors"
        tensors = load_file(str(weights))
        save_file({"bert." + k: v.contiguous() for k, v in tensors.items()}, str(weights))
(out_dir / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
print("wrote", out_dir)
