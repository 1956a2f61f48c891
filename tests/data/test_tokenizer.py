import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flame.data.tokenizer import EOS_TOKEN, TokenizerConfig, backend, load_tokenizer, train_tokenizer
from flame.errors import ConfigError, DataError, OutputExistsError
from tests.data.helpers import documents, write_jsonl


def test_trained_tokenizer_loads_with_autotokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == 0
    assert 257 < len(tok) <= 400  # 256 bytes + EOS + merges (fewer when the corpus runs out of pairs)
    # Byte-level: any text, including characters never seen in training, round-trips exactly.
    text = "doc 7: gated \u0394Net caf\u00e9 \U0001f525\n\tindent"
    ids = tok(text)["input_ids"]
    assert EOS_TOKEN not in tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == text


def test_load_tokenizer_checks_eos_and_fast(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    assert tok.is_fast and tok.eos_token_id == 0


def test_missing_tokenizer_says_how_to_build_one_offline(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer dir .*does not exist.*flame data tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"cannot load tokenizer 'nobody/no-such-tokenizer'.*flame data tokenizer"):
        load_tokenizer("nobody/no-such-tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"cannot load tokenizer .*empty.*flame data tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "dataset" / "tokenizer").mkdir(parents=True)  # a prepared dataset given as --tokenizer
    inner = tmp_path / "dataset" / "tokenizer"
    with pytest.raises(
        DataError, match=rf"holds its tokenizer in a subfolder, not at the top: give --tokenizer {inner}"
    ):
        load_tokenizer(str(tmp_path / "dataset"))


def test_tokenizer_without_eos_is_refused(tmp_path):
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=bare).save_pretrained(tmp_path / "noeos")
    with pytest.raises(DataError, match="has no EOS token"):
        load_tokenizer(str(tmp_path / "noeos"))


def test_backend_encodes_exactly_like_the_transformers_call(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # A BOS template and a truncation setting in tokenizer.json: transformers adds the BOS and ignores the
    # truncation for a plain call, and the backend copy must do the same.
    rust = Tokenizer.from_str(tok._tokenizer.to_str())
    rust.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[(EOS_TOKEN, 0)])
    rust.enable_truncation(max_length=5)
    bos = PreTrainedTokenizerFast(tokenizer_object=rust, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
    texts = documents(20) + [f"text with {EOS_TOKEN} inside"]
    for t in (tok, bos):
        expected = t(texts)["input_ids"]
        assert [e.ids for e in backend(t).encode_batch_fast(texts, add_special_tokens=True)] == expected
    assert bos(texts[0])["input_ids"][0] == 0 and len(bos(texts[0])["input_ids"]) > 5


def test_train_refuses_existing_output_and_tiny_vocab(tmp_path, tokenizer_dir):
    with pytest.raises(OutputExistsError, match="exists.*--overwrite"):
        train_tokenizer(TokenizerConfig(inputs=[str(tmp_path)], output=str(tokenizer_dir)))
    with pytest.raises(ConfigError, match="--vocab-size 100"):
        train_tokenizer(TokenizerConfig(inputs=[str(tmp_path)], output=str(tmp_path / "t"), vocab_size=100))


def test_train_overwrite_replaces_and_max_docs(tmp_path):
    write_jsonl(tmp_path / "c" / "a.jsonl", documents(50))
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    config = TokenizerConfig(inputs=[str(tmp_path / "c")], output=str(out), vocab_size=300, max_docs=10, overwrite=True)
    with pytest.raises(OutputExistsError, match="is not a tokenizer folder .no tokenizer.json in it"):
        train_tokenizer(config)  # a folder of the user's is never replaced
    (out / "tokenizer.json").write_text("{}")
    (out / "config.json").write_text("{}")  # a model dir has a tokenizer.json too
    with pytest.raises(OutputExistsError, match=r"is not a tokenizer folder \(it holds config.json\)"):
        train_tokenizer(config)
    (out / "config.json").unlink()  # an earlier tokenizer is replaced
    result = train_tokenizer(config)
    assert result["documents"] == 10 and 257 < result["vocab_size"] <= 300
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "tok"]  # no temp or .old folder left


def test_train_refuses_to_write_over_its_input_even_with_overwrite(tmp_path):
    write_jsonl(tmp_path / "c" / "a.jsonl", documents(50))
    with pytest.raises(OutputExistsError, match="is, holds, or lies inside the input"):
        train_tokenizer(TokenizerConfig(inputs=[str(tmp_path / "c")], output=str(tmp_path / "c"), overwrite=True))
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["a.jsonl"]


def test_a_full_disk_is_one_error(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from flame.errors import FlameError

    def full(self, *args, **kwargs):  # what the Rust tokenizer raises: a plain Exception with the OS's words
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full)
    write_jsonl(tmp_path / "c" / "a.jsonl", documents(20))
    config = TokenizerConfig(inputs=[str(tmp_path / "c")], output=str(tmp_path / "tok"), vocab_size=300)
    with pytest.raises(FlameError, match=rf"^no space left on the disk of {tmp_path}: free space on that disk"):
        train_tokenizer(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_train_on_empty_text_fails(tmp_path):
    write_jsonl(tmp_path / "c" / "a.jsonl", ["", ""])
    with pytest.raises(DataError, match="no documents in"):
        train_tokenizer(TokenizerConfig(inputs=[str(tmp_path / "c")], output=str(tmp_path / "t"), vocab_size=300))
    assert not (tmp_path / "t").exists()
