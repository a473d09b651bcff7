"""The tiny-model tokenizer: trained with sentencepiece, saved in HF format, loaded back by AutoTokenizer."""

from __future__ import annotations

import io
import json
import random

import pytest
from helpers import LLAMA3_SPECIALS, char_tokenizer_dir, tokenizer_corpus

from fspo_engine.engine.errors import FspoError
from fspo_engine.engine.tokenizer import SPM_TRAINER_OPTIONS, _bpe_merges, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(tokenizer_corpus(seed=0), vocab_size=400, out_dir=out), out


ODD_TEXTS = [
    "# Example 1\n## Question \nWhat?\n## Preferred Response \nYes.\n",
    "##",
    "#",
    "\n",
    "\n\n\n",
    " ",
    "   leading and trailing   ",
    "tab\there",
    "crlf\r\nline",
    "naïve café 東京 🙂 Ω≈ç",
    "<0x41> looks like a byte piece",
    "<s> and </s> as text",
    "x" * 300,
    "",
]


def test_round_trip_is_exact_for_markers_whitespace_and_unicode(trained):
    tok, _ = trained
    rng = random.Random(0)
    alphabet = "ab #\n\t\r é東🙂.!12<>/_"
    texts = ODD_TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids  # no special tokens from plain text
    assert tok.encode_batch(texts[:5]) == [tok.encode(t) for t in texts[:5]]


def test_saved_tokenizer_loads_offline_and_matches_sentencepiece(trained):
    import sentencepiece as spm

    tok, out = trained
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    again = load_tokenizer(out)
    assert (again.bos_id, again.eos_id) == (1, 2) and again.vocab_size == tok.vocab_size <= 400
    # The converted tokenizer segments exactly as the sentencepiece model it came from.
    blob = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(seed=0)), model_writer=blob, vocab_size=400, **SPM_TRAINER_OPTIONS
    )
    sp = spm.SentencePieceProcessor(model_proto=blob.getvalue())
    assert len(_bpe_merges(sp)) > 50
    for text in ODD_TEXTS + tokenizer_corpus(seed=1)[:50]:
        assert again.encode(text) == sp.encode(text), repr(text)


def test_learned_pieces_compress_text(trained):
    tok, _ = trained
    corpus = tokenizer_corpus(seed=2)[:100]
    n_tokens = sum(len(ids) for ids in tok.encode_batch(corpus))
    n_bytes = sum(len(t.encode()) for t in corpus)
    assert n_tokens < n_bytes / 1.8  # merges were learned: ~2.2 bytes per token at vocab 400


def test_load_errors_name_the_directory(tmp_path):
    with pytest.raises(FspoError, match="not a model directory"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FspoError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FspoError, match="could not load the tokenizer"):
        load_tokenizer(tmp_path)


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(FspoError, match="no text"):
        train_tokenizer(["", ""], 400, tmp_path)
    with pytest.raises(FspoError, match="vocab_size"):
        train_tokenizer(["abc"], 100, tmp_path)


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_sentencepiece_only_directory_loads_and_segments_like_sentencepiece(tmp_path, dummy_prefix):
    """A Llama-2-style directory (tokenizer.model, no tokenizer.json) loads even where transformers cannot
    convert it (no protobuf), and segments exactly as sentencepiece does, dummy-prefix space included."""
    import sentencepiece as spm

    blob = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(seed=4)),
        model_writer=blob,
        model_type="bpe",
        vocab_size=450,
        hard_vocab_limit=False,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(blob.getvalue())
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_proto=blob.getvalue())
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    rng = random.Random(1)
    alphabet = "ab #\n\t é東🙂.!12<>/_"
    texts = ODD_TEXTS + [" lead", "  two", "".join(rng.choice(alphabet) for _ in range(80))]
    texts += tokenizer_corpus(seed=5)[:40]
    for text in texts:
        assert tok.encode(text) == sp.encode(text), repr(text)
        assert tok.decode(tok.encode(text)) == text, repr(text)


def _sentencepiece_dir(tmp_path, model_type="bpe"):
    import sentencepiece as spm

    blob = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tokenizer_corpus(seed=4)), model_writer=blob,
                                   model_type=model_type, vocab_size=450, hard_vocab_limit=False,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(blob.getvalue())
    return spm.SentencePieceProcessor(model_proto=blob.getvalue())


def test_sentencepiece_directory_reads_added_tokens_and_special_names_and_refuses_unigram(tmp_path):
    """A chat fine-tune's sentencepiece-only directory: added tokens continue the vocabulary and the config
    names its eos, as transformers reads them. A unigram model, which the BPE conversion would segment
    wrongly, is refused with one clear error."""
    sp = _sentencepiece_dir(tmp_path)
    n = sp.get_piece_size()
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_start|>": n, "<|im_end|>": n + 1}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<s>"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), n + 1, n + 2)
    assert tok.encode("say <|im_end|> here") == sp.encode("say <|im_end|> here")  # data text stays text
    # data.split_special_tokens = false: special tokens are read, the text between them segmented by
    # sentencepiece piece by piece (as transformers' legacy Llama tokenizers do).
    released = load_tokenizer(tmp_path, split_special_tokens=False)
    assert released.encode("say <|im_end|> here</s>") == sp.encode("say ") + [n + 1] + sp.encode(" here") + [2]
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": n + 5}))
    with pytest.raises(FspoError, match="continue the vocabulary"):
        load_tokenizer(tmp_path)

    uni = tmp_path / "unigram"
    uni.mkdir()
    _sentencepiece_dir(uni, model_type="unigram")
    with pytest.raises(FspoError, match="unigram"):
        load_tokenizer(uni)


def test_split_special_tokens_false_reads_special_token_texts_as_the_released_call(tmp_path):
    """`tokenizer(text, add_special_tokens=False)`, the released loader's call, turns "</s>", "<|eot_id|>" and
    "<|begin_of_text|>" in a text into their ids: split_special_tokens=False gives the same ids; True (our
    default) splits them as plain text."""
    from transformers import AutoTokenizer

    path = char_tokenizer_dir(tmp_path)
    text = "Sure.</s> Next <|eot_id|> end <|begin_of_text|>x"
    released = AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
    ids = {t: i for i, t in enumerate(LLAMA3_SPECIALS, 1)}
    assert [i for i in released if i in ids.values()] == [ids["</s>"], ids["<|eot_id|>"], ids["<|begin_of_text|>"]]

    parsed = load_tokenizer(path, split_special_tokens=False)
    assert (parsed.bos_id, parsed.eos_id) == (ids["<|begin_of_text|>"], ids["<|eot_id|>"])
    assert parsed.encode(text) == released and parsed.encode_batch([text, "a</s>"])[0] == released
    split = load_tokenizer(path)
    assert not set(split.encode(text)) & set(ids.values()) and split.decode(split.encode(text)) == text
    assert split.encode_batch([text]) == [split.encode(text)]


def test_tokenizer_config_without_its_vocabulary_is_refused(tmp_path):
    """tokenizer_config.json whose tokenizer.model was forgotten loads in transformers as a 3-token tokenizer
    that encodes every text to nothing; training on that would be silent garbage."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    with pytest.raises(FspoError, match="vocabulary file"):
        load_tokenizer(tmp_path)
