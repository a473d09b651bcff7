"""Tokenizers: load a model directory's tokenizer, or train a small one for `--model tiny` runs.

Loading goes through `transformers.AutoTokenizer` (never `trust_remote_code`), so any HF Llama directory
with a `tokenizer.json` works: Llama 3's byte-level BPE, Llama 2's, or the one trained here. A directory with
only a sentencepiece `tokenizer.model` is converted here (`_hf_from_sentencepiece`), segmenting exactly as
sentencepiece does.

Training uses sentencepiece (BPE, byte fallback, no normalisation) and saves the result as a `tokenizer.json`
that `tokenizers` runs directly: the sentencepiece vocabulary and its merges become a `tokenizers` BPE model.
Byte fallback plus an identity normaliser means every string round-trips exactly: the "##" and "#" of the
episode format, newlines, runs of spaces, tabs, emoji.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fspo_engine.data_gen.atomic import atomic_path
from fspo_engine.engine.errors import FspoError


@dataclass
class Tokenizer:
    """A thin wrapper over an HF tokenizer: plain `encode` (no special tokens added) plus the bos/eos ids."""

    hf: object  # a transformers PreTrainedTokenizerBase
    bos_id: int
    eos_id: int
    path: str = ""
    # True: a special token's text inside a text ("</s>", "<|eot_id|>") is split as plain text. False: it
    # becomes that special token's id, as the released loader's `tokenizer(text, add_special_tokens=False)`
    # gives (`data.split_special_tokens`).
    split_special_tokens: bool = True

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. None are added (episode rendering adds bos/eos itself); by default none are
        parsed either, so a "</s>" typed in a dataset is plain text, not an eos that ends a response."""
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=self.split_special_tokens)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (the fast tokenizers run the batch in Rust threads)."""
        if not texts:
            return []
        out = self.hf(texts, add_special_tokens=False, split_special_tokens=self.split_special_tokens)
        return out["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (added tokens included); the model's vocab may be larger."""
        return len(self.hf)


def load_tokenizer(model_dir: str | os.PathLike, *, split_special_tokens: bool = True) -> Tokenizer:
    """The tokenizer of an HF model directory, offline. Raises FspoError when it is missing or unusable.
    `split_special_tokens`: see `Tokenizer` (a run's `data.split_special_tokens`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FspoError(f"{model_dir}: not a model directory")
    if not any(
        (model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        raise FspoError(
            f"{model_dir}: no tokenizer files (tokenizer.json, tokenizer.model or tokenizer_config.json)"
        )
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    sp_file = model_dir / "tokenizer.model"
    if sp_file.is_file() and not (model_dir / "tokenizer.json").is_file():
        # A sentencepiece-only directory (Llama 2 style). We convert it ourselves: transformers needs protobuf
        # for that, and its conversion differs from sentencepiece on text that starts with a space.
        hf = _load_sentencepiece(sp_file)
        _apply_tokenizer_config(hf, model_dir)
    else:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # transformers warns about unrelated defaults on every load
        try:
            hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, ImportError, ...)
            raise FspoError(
                f"{model_dir}: could not load the tokenizer ({type(exc).__name__}: {exc})"
            ) from None
        finally:
            hf_logging.set_verbosity(verbosity)
    # A tokenizer_config.json whose vocabulary file is missing loads as a 3-token tokenizer that encodes
    # every text to nothing: catch it here rather than train on empty episodes.
    probe = "The quick brown fox, 42 times."
    ids = hf.encode(probe, add_special_tokens=False)
    if len(hf) < 8 or not ids or all(i == hf.unk_token_id for i in ids):
        raise FspoError(
            f"{model_dir}: the tokenizer has {len(hf)} tokens and encodes {probe!r} as {ids}; "
            "its vocabulary file (tokenizer.json, tokenizer.model or vocab.json + merges.txt) is missing or broken"
        )
    bos, eos = hf.bos_token_id, hf.eos_token_id
    if eos is None:
        raise FspoError(f"{model_dir}: the tokenizer has no eos token (responses end with eos)")
    if bos is None:
        # Some tokenizers have no bos; the prompt still needs a first token that predicts nothing.
        raise FspoError(f"{model_dir}: the tokenizer has no bos token (prompts start with bos)")
    return Tokenizer(hf=hf, bos_id=int(bos), eos_id=int(eos), path=str(model_dir),
                     split_special_tokens=split_special_tokens)


def _apply_tokenizer_config(hf, model_dir: Path) -> None:
    """A sentencepiece-only directory's added tokens (tokenizer_config.json's added_tokens_decoder or
    added_tokens.json) and special-token names (e.g. a chat fine-tune's eos "<|im_end|>"), as transformers
    would read them. Added tokens must continue the vocabulary in id order, which is how they are made."""
    cfg, added = {}, {}
    for name in ("tokenizer_config.json", "added_tokens.json"):
        path = model_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise FspoError(f"{path}: unreadable ({exc})") from None
            if not isinstance(data, dict):
                raise FspoError(f"{path}: expected a JSON object")
            if name == "added_tokens.json":
                added.update({int(i): t for t, i in data.items()})
            else:
                cfg = data
                for i, entry in (data.get("added_tokens_decoder") or {}).items():
                    added.setdefault(int(i), entry.get("content") if isinstance(entry, dict) else entry)
    from tokenizers import AddedToken

    for i in sorted(added):
        if i < len(hf):
            if hf.convert_ids_to_tokens(i) != added[i]:
                raise FspoError(f"{model_dir}: added token {added[i]!r} has id {i}, which the sentencepiece "
                                f"model already uses for {hf.convert_ids_to_tokens(i)!r}")  # fmt: skip
            continue
        if i != len(hf):
            raise FspoError(f"{model_dir}: added token ids must continue the vocabulary ({len(hf)}), got {i}")
        hf.add_tokens([AddedToken(added[i], special=True, normalized=False)], special_tokens=True)
    for role in ("bos_token", "eos_token", "unk_token"):
        value = cfg.get(role)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in hf.get_vocab():
            setattr(hf, role, value)


def check_ids_fit(tokenizer: Tokenizer, vocab_size: int, where, id_lists: Iterable[Sequence[int]] = ()) -> None:
    """Raise FspoError when bos, eos or any id in `id_lists` is outside the model's embedding [0, vocab_size).

    A tokenizer may know more tokens than the model (an unused added pad token is harmless); what matters
    is the ids the episodes actually use. Checked before a run writes anything (an out-of-range id is an
    IndexError on CPU and a device-side assert on CUDA)."""
    top, what = max((tokenizer.bos_id, "bos"), (tokenizer.eos_id, "eos"))
    for ids in id_lists:
        if ids and max(ids) > top:
            top, what = max(ids), "text"
    if top >= vocab_size:
        source = "emits" if what == "text" else f"has {what} id"
        raise FspoError(
            f"{where}: the tokenizer {source} {top}, beyond the model's vocab_size {vocab_size} "
            "(a tokenizer with added tokens needs a model whose embeddings were resized)"
        )


def _bpe_merges(sp) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE model, in priority order, for a `tokenizers` BPE model.

    sentencepiece stores BPE pieces sorted by merge order (lower id = merged earlier) but no merge list.
    Every way a piece splits into two pieces that are both in the vocabulary is a merge producing it,
    ranked by the produced piece's id; ties between splits of one piece go to the earlier pieces.
    """
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = []
    for piece, pid in vocab.items():
        if sp.is_byte(pid) or sp.is_control(pid) or sp.is_unknown(pid):
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        splits.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        ranked.extend((pid, ab) for ab in splits)
    ranked.sort(key=lambda r: r[0])  # stable: split order kept within a piece
    return [ab for _, ab in ranked]


def _hf_from_sentencepiece(sp):
    """A `transformers` fast tokenizer that segments exactly as the sentencepiece BPE processor `sp`.

    The sentencepiece vocabulary and its merges (`_bpe_merges`) become a `tokenizers` BPE model with byte
    fallback and no normaliser (our models and Llama's use the identity normalisation). Whether the model
    adds a dummy-prefix space is read from its behaviour, since its options are only readable via protobuf.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    unk = sp.id_to_piece(sp.unk_id())
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    byte_fallback = any(sp.is_byte(i) for i in range(n))
    rust = RustTokenizer(
        BPE(vocab=vocab, merges=_bpe_merges(sp), unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)
    )
    # Spaces become "▁" as in sentencepiece, with its dummy prefix when the model has one (always added,
    # even before a leading space, unlike `Metaspace`'s prepend). No pre-tokenizer: sentencepiece BPE runs
    # on the whole string, so runs of spaces ("▁▁") merge as it merges them.
    steps = [normalizers.Prepend("\u2581")] if dummy_prefix else []
    rust.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    rust.decoder = decoders.Sequence(steps)
    special = {}
    for name, pid in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
        if pid >= 0:
            special[name] = sp.id_to_piece(pid)
    return PreTrainedTokenizerFast(tokenizer_object=rust, **special)


def _load_sentencepiece(path: Path):
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise FspoError(f"{path}: not a readable sentencepiece model ({exc})") from None
    hf = _hf_from_sentencepiece(sp)
    # The conversion is exact for BPE models only (a unigram model segments by piece scores): check it
    # segments like sentencepiece on probe texts, among them runs of the model's own pieces.
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(0, n, max(1, n // 200))
              if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]  # fmt: skip
    probes = [_PROBE_TEXT, "".join(pieces).replace("\u2581", " "), " ".join(pieces[::-1]).replace("\u2581", " ")]
    # sentencepiece reads "</s>" in a text as text: the probes compare with special tokens split. Loaded with
    # split_special_tokens = False, the converted tokenizer parses them (bos/eos/unk are its special tokens),
    # as transformers' own Llama tokenizers do.
    for text in probes:
        if hf.encode(text, add_special_tokens=False, split_special_tokens=True) != sp.encode(text):
            raise FspoError(
                f"{path}: converted, this sentencepiece model segments differently from sentencepiece (a unigram "
                "model, or text normalization other than identity?); only Llama-style BPE tokenizer.model files "
                "are converted here: add the model's tokenizer.json"
            )
    return hf


_PROBE_TEXT = (
    "Given the examples above, generate a preferred response to the following question.\n"
    "  Two  spaces, tabs\tand digits 12345; naïve café — “quotes” 🙂 漢字.\n## Question \nWhy?"
)


# sentencepiece BPE as the from-scratch tokenizer is trained (train_tokenizer; the tests reuse it).
SPM_TRAINER_OPTIONS = dict(
    model_type="bpe",
    hard_vocab_limit=False,  # a small corpus may not have vocab_size pieces: take what it has
    byte_fallback=True,  # characters outside the vocabulary become <0xNN> pieces, never <unk>
    normalization_rule_name="identity",  # keep text as is: no NFKC, spaces and newlines intact
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,  # prompt and responses are tokenized separately: no invented spaces
    allow_whitespace_only_pieces=True,
    split_digits=True,
    character_coverage=0.9995,
    max_sentence_length=1 << 20,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    minloglevel=2,
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                    whole_pieces: Sequence[str] = ()) -> Tokenizer:
    """Train a sentencepiece BPE tokenizer on `texts` and save it in HF format under `out_dir`.

    `whole_pieces` (e.g. the episode format's headers, `episodes.FORMAT_PIECES`) become single tokens,
    matched before BPE: a few-shot context then spends its tokens on content, not on "## Preferred Response".

    ids 0, 1, 2 are <unk>, <s>, </s>; then the 256 byte-fallback pieces; then learned pieces. The
    vocabulary may come out smaller than `vocab_size` on a small corpus (never larger): size the model's
    embedding by `vocab_size` and it covers every id. Files are written to a temp dir and moved in.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise FspoError("train_tokenizer: no text to train on")
    if vocab_size < 300:
        raise FspoError(
            f"train_tokenizer: vocab_size must be >= 300 (3 special + 256 byte pieces), got {vocab_size}"
        )
    blob = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=blob, vocab_size=vocab_size, **SPM_TRAINER_OPTIONS
        )
    except RuntimeError as exc:
        raise FspoError(f"train_tokenizer: sentencepiece failed ({exc})") from None
    hf = _hf_from_sentencepiece(spm.SentencePieceProcessor(model_proto=blob.getvalue()))
    if whole_pieces:
        from tokenizers import AddedToken

        hf.add_tokens([AddedToken(p, normalized=False, special=False, single_word=False, lstrip=False,
                                  rstrip=False) for p in dict.fromkeys(whole_pieces)])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as tmp:
        hf.save_pretrained(tmp)
        cfg_path = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        # A class name that transformers 4.x and 5.x both know; never a remote-code class.
        cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
        for f in sorted(Path(tmp).iterdir()):
            with atomic_path(out / f.name) as staged:  # fsynced, then renamed over an older file
                os.replace(f, staged)
    return load_tokenizer(out)


__all__ = ["Tokenizer", "load_tokenizer", "train_tokenizer"]
